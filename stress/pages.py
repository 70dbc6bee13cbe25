"""A local HTTP server for the stress scenarios and browser tests: 127.0.0.1 only, never the internet.

/         a plain page
/login    sets a ``session`` cookie (a login); ``?account=a&kind=session`` makes it a session cookie
/console  "Console <account>" for a logged-in browser, else "Please log in"
/whoami   shows the cookie the browser sent
/table    a table to scrape
/slow     answers after half a second
/spin     a page whose JavaScript never returns
/alloc    a page that holds about 600 MB
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_TABLE = "".join(f"<tr><td>{i}</td><td>item {i}</td></tr>" for i in range(20))
PAGES = {
    "/": "<title>home</title><h1>home</h1>",
    "/login": "<title>login</title><p>logged in</p>",
    "/table": f"<title>table</title><table id='t'>{_TABLE}</table>",
    "/slow": "<title>slow</title><p>slow</p>",
    "/spin": "<title>spin</title><script>while (true) {}</script>",
    "/alloc": "<title>alloc</title><script>window.held = []; for (let i = 0; i < 60; i++)"
    " { const a = new Uint8Array(10 * 1024 * 1024); a.fill(1); window.held.push(a); }</script><p>held</p>",
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        cookie = self.headers.get("Cookie", "")
        if path == "/whoami":
            body = f"<title>whoami</title><p id='who'>{cookie}</p>"
        elif path == "/console":
            who = dict(p.split("=", 1) for p in cookie.split("; ") if "=" in p).get("session")
            body = f"<title>console</title><p id='who'>{f'Console {who}' if who else 'Please log in'}</p>"
        elif path in PAGES:
            body = PAGES[path]
        else:
            self.send_error(404)
            return
        if path == "/slow":
            time.sleep(0.5)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        if path == "/login":
            query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
            lasting = "" if query.get("kind") == "session" else "; Max-Age=3600"
            self.send_header("Set-Cookie", f"session={query.get('account', 'someone')}{lasting}; Path=/")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a browser closing a connection early is not news


class PageServer:
    """Serves PAGES from a daemon thread until ``close``."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="pages", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
