"""``python -m stress [SCENARIO] [options]``.

Scenarios: demo (the default), chaos, hostile, soak, compare, pertask, floor, overhead, browsers, remote,
cluster.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SCENARIOS = (
    "demo",
    "chaos",
    "hostile",
    "soak",
    "compare",
    "pertask",
    "floor",
    "overhead",
    "browsers",
    "remote",
    "cluster",
)


def main(argv: list[str]) -> int:
    name = argv[0] if argv and argv[0] in SCENARIOS else "demo"
    rest = argv[1:] if argv and argv[0] in SCENARIOS else argv
    module = importlib.import_module(f"stress.{name}")  # compare needs the peers; the demo does not
    parser = argparse.ArgumentParser(prog=f"python -m stress {name}", description=module.__doc__)
    module.add_arguments(parser)
    return module.run(parser.parse_args(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
