"""The emulator's HTTP side: the Web API, file upload URLs and response URLs on one port.

Routes (all on 127.0.0.1, port chosen by the OS):
- `POST|GET /api/<method>`: form-encoded, JSON or multipart bodies, plus query parameters; the
  token from `Authorization: Bearer` or a `token` argument, as slack_sdk sends either.
- `POST /upload/<file_id>`: the bytes of a files.getUploadURLExternal upload (raw or multipart).
- `POST /response/<key>`: a response_url message (JSON, or a form with `payload`).

`ThreadingHTTPServer` serves each request on its own thread, so a bot that calls the Web API
from inside an event handler never waits behind another request.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bot.emulator import interactions
from bot.emulator.web_api import WebApi


def parse_multipart(body: bytes, content_type: str) -> tuple[dict, bytes | None]:
    """Form fields and the first file's bytes of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields, file_bytes = {}, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            file_bytes = payload if file_bytes is None else file_bytes
        elif name:
            fields[name] = payload.decode("utf-8")
    return fields, file_bytes


def parse_params(body: bytes, content_type: str, query: str) -> dict:
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if not body:
        return params
    if content_type.startswith("application/json"):
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("a JSON body must be an object")
        params.update(data)
    elif content_type.startswith("multipart/form-data"):
        params.update(parse_multipart(body, content_type)[0])
    else:
        params.update(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    return params


class _Handler(BaseHTTPRequestHandler):
    server_version = "SlackEmulator/1.0"
    api: WebApi  # set on the subclass made per server

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict, headers: dict | None = None):
        body = json.dumps(data).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._route(b"")

    def do_POST(self):  # noqa: N802
        self._route(self._body())

    def _route(self, body: bytes) -> None:
        parts = urllib.parse.urlsplit(self.path)
        content_type = self.headers.get("Content-Type", "")
        segments = parts.path.strip("/").split("/")
        if len(segments) == 2 and segments[0] == "api":
            try:
                params = parse_params(body, content_type, parts.query)
            except (ValueError, UnicodeDecodeError) as exc:
                self._json(200, {"ok": False, "error": "invalid_json", "detail": str(exc)})
                return
            auth = self.headers.get("Authorization", "")
            token = auth[7:].strip() if auth.startswith("Bearer ") else params.get("token")
            status, data, headers = self.api.call(segments[1], params, token)
            self._json(status, data, headers)
        elif len(segments) == 2 and segments[0] == "upload" and self.command == "POST":
            if content_type.startswith("multipart/form-data"):
                body = parse_multipart(body, content_type)[1] or b""
            with self.api.ws.lock:
                pending = self.api.ws.pending_uploads.get(segments[1])
                if pending is not None:
                    pending["bytes"] = body
            if pending is None:
                self._send(404, b"file_not_found", "text/plain")
            else:
                self._send(200, f"OK - {len(body)}".encode(), "text/plain")
        elif len(segments) == 2 and segments[0] == "response" and self.command == "POST":
            try:
                if content_type.startswith("application/x-www-form-urlencoded"):
                    form = dict(urllib.parse.parse_qsl(body.decode("utf-8")))
                    data = json.loads(form.get("payload", "{}"))
                else:
                    data = json.loads(body or b"{}")
            except ValueError:
                self._send(400, b"invalid_payload", "text/plain")
                return
            status, text = interactions.apply_response_url(self.api, key=segments[1], body=data)
            self._send(status, text.encode(), "text/plain")
        else:
            self._send(404, b"not_found", "text/plain")


class EmulatorServer:
    """A ThreadingHTTPServer on 127.0.0.1 running in a daemon thread."""

    def __init__(self, *, api: WebApi, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = type("EmulatorHandler", (_Handler,), {"api": api})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="slack-emulator",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
