"""The sandbox's web server: the page, its static files, and two JSON endpoints.

Routes:
- `GET /` and `GET /static/<name>`: the page (plain HTML, CSS and vanilla JS; no build step).
- `GET /api/state?user=U…`: what that person sees (`bot.sandbox.state`), polled by the page.
- `POST /api/act`: `{"user", "action", ...}`, carried out on the emulator (`bot.sandbox.actions`).

It binds in the constructor, before anything slow starts, so a taken port is reported at once
(`PortTaken`). On a loopback address it also refuses requests whose Host header names another
host (a web page elsewhere cannot reach it through DNS rebinding), and actions must be sent as
`application/json`, which a cross-site form cannot do without a CORS preflight we never grant.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bot.sandbox.actions import ActionError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 256 * 1024


class PortTaken(OSError):
    """The port is in use; the message says what to do."""


class PageServer:
    """A ThreadingHTTPServer bound at construction, served from a daemon thread by `start`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        state_for: Callable[[str], bytes] | None = None,
        act: Callable[[str, str, dict], dict] | None = None,
    ) -> None:
        self.state_for = state_for
        self.act = act
        handler = type("SandboxHandler", (_Handler,), {"page": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                why = "taken" if exc.errno == errno.EADDRINUSE else "not allowed for this user"
                raise PortTaken(
                    exc.errno,
                    f"port {port} is {why}: pass --port with a free one (e.g. --port {port + 1})",
                ) from None
            raise
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def loopback_only(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")

    def start(self) -> PageServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="sandbox-page",
            daemon=True,
        )
        self._thread.start()
        return self

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "ApprenticeSandbox/1.0"
    page: PageServer  # set on the subclass made per server

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        log.debug("%s - %s", self.address_string(), format % args)

    # -- responses ---------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict | bytes) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"ok": False, "error": message})

    def _host_allowed(self) -> bool:
        if not self.page.loopback_only:
            return True  # bound to a public address on purpose: the person chose that
        host = (self.headers.get("Host") or "").strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.rsplit(":", 1)[0] if ":" in host else host
        return name in LOOPBACK or name.startswith("127.")

    # -- routes ------------------------------------------------------------------------------

    def do_GET(self):  # noqa: N802 - http.server's naming
        if not self._host_allowed():
            self._error(403, "the sandbox answers only to requests for 127.0.0.1 / localhost")
            return
        parts = urllib.parse.urlsplit(self.path)
        if parts.path in ("/", "/index.html"):
            self._static("index.html")
        elif parts.path.startswith("/static/"):
            self._static(parts.path[len("/static/") :])
        elif parts.path == "/api/state":
            query = dict(urllib.parse.parse_qsl(parts.query))
            user = query.get("user", "")
            try:
                self._json(200, self.page.state_for(user))
            except ActionError as exc:
                self._error(400, str(exc))
        else:
            self._error(404, f"no page at {parts.path}; open / for the sandbox")

    def _static(self, name: str) -> None:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            self._error(404, f"no static file {name!r}")
            return
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        self._send(200, path.read_bytes(), content_type)

    def do_POST(self):  # noqa: N802
        if not self._host_allowed():
            self._error(403, "the sandbox answers only to requests for 127.0.0.1 / localhost")
            return
        if urllib.parse.urlsplit(self.path).path != "/api/act":
            self._error(404, "POST actions to /api/act")
            return
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._error(415, "send actions as application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(413, "action too large")
            return
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(request, dict):
                raise ValueError("an action must be a JSON object")
            user, action = str(request.pop("user", "")), str(request.pop("action", ""))
            self._json(200, self.page.act(user, action, request))
        except (ActionError, ValueError, LookupError) as exc:
            self._error(400, str(exc).strip("'\""))
        except Exception as exc:  # a bug, not the person's fault: say so, keep serving
            log.exception("sandbox action failed")
            self._error(500, f"the sandbox failed: {type(exc).__name__}: {exc}")
