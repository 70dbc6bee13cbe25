from __future__ import annotations

from procpool import _payload
from procpool._payload import dump_call, dump_function, load_call


def test_a_call_round_trips_and_a_function_is_unpickled_once() -> None:
    _payload._cache.clear()
    scale = 3
    fn_blob = dump_function(lambda x, y=0: x * scale + y)
    first = load_call(dump_call(fn_blob, (2,), {"y": 1}))
    second = load_call(dump_call(fn_blob, (5,), {}))
    assert first[0](*first[1], **first[2]) == 7 and second[0](*second[1], **second[2]) == 15
    assert first[0] is second[0] and len(_payload._cache) == 1


def test_the_cache_keeps_a_bounded_number_of_functions() -> None:
    _payload._cache.clear()
    for n in range(_payload._CACHE_SIZE + 10):
        load_call(dump_call(dump_function(lambda n=n: n), (), {}))
    assert len(_payload._cache) == _payload._CACHE_SIZE


class _Local:  # a class pickled by reference: it is found by its module's name
    pass


def test_code_pickled_by_value_is_marked_for_its_own_python_only() -> None:
    def closure(x: int) -> int:
        return x

    class Defined:  # defined in a function: it travels by value
        pass

    by_reference = dump_function(_payload.dump_call)
    by_value = dump_function(lambda x: x + 1)
    assert not _payload.needs_same_python(dump_call(by_reference, (1, "a", [2.0], {"k": None}), {}))
    assert not _payload.needs_same_python(dump_call(by_reference, (_Local(),), {}))
    assert _payload.needs_same_python(dump_call(by_value, (1,), {}))
    assert _payload.needs_same_python(dump_call(dump_function(closure), (), {}))
    assert _payload.needs_same_python(dump_call(by_reference, (closure,), {}))  # code in the arguments
    assert _payload.needs_same_python(dump_call(by_reference, (), {"obj": Defined()}))
    assert _payload.PYTHON.count(".") == 1
