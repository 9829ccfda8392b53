"""HTTP mode: Bolt at `POST /slack/events`, plus `GET /healthz` and `GET /metrics`.

A plain WSGI app (Bolt's own WSGI adapter for the Slack route) served by the standard library's
wsgiref with one thread per request: acknowledgements are tiny and must never queue behind a
slow client. `serve()` binds where it is told (port 0 in tests) and runs in a daemon thread.
"""

from __future__ import annotations

import json
import logging
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from sqlalchemy import text

from bot.slack.services import Services

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


def create_wsgi_app(app: App, services: Services):
    """The WSGI callable for the bot's HTTP endpoints."""
    slack = SlackRequestHandler(app)

    def health() -> tuple[str, dict]:
        db_ok = True
        try:
            with services.db.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as exc:  # report, don't raise: this is what health checks are for
            log.warning("health check: database unreachable: %s", exc)
            db_ok = False
        body = {
            "ok": db_ok,
            "db": db_ok,
            "active_adapter": services.active_version(),
            "engine_queue": services.queue_depth(),
            "answers_in_flight": services.dispatcher.in_flight() if services.dispatcher else 0,
        }
        return ("200 OK" if db_ok else "503 Service Unavailable"), body

    def wsgi(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == EVENTS_PATH and method == "POST":
            return slack(environ, start_response)
        if path == "/healthz" and method == "GET":
            status, body = health()
            payload = json.dumps(body).encode()
            start_response(status, [("Content-Type", "application/json")])
            return [payload]
        if path == "/metrics" and method == "GET":
            payload = services.metrics.render()
            start_response("200 OK", [("Content-Type", services.metrics.content_type)])
            return [payload]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: Slack posts to /slack/events\n"]

    return wsgi


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs in a burst; the client's retransmit then
    # costs a full second of ack latency (measured with bench/ack_bench.py)
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - wsgiref's signature
        log.debug("%s - %s", self.address_string(), format % args)


class HttpServer:
    """A running server: `.port` (the bound one), `.shutdown()`."""

    def __init__(self, server: WSGIServer) -> None:
        self._server = server
        self.host, self.port = server.server_address[:2]
        self._thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def wait(self) -> None:
        self._thread.join()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(wsgi_app, *, host: str = "127.0.0.1", port: int = 0) -> HttpServer:
    server = make_server(
        host, port, wsgi_app, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    return HttpServer(server)
