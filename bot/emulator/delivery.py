"""Delivering requests to the bot: signed exactly as Slack signs them, retried as Slack retries.

Signing uses `slack_sdk.signature.SignatureVerifier.generate_signature`, the same code Bolt uses
to check it, over the exact bytes sent: `v0=` + HMAC-SHA256 of `v0:{timestamp}:{body}`, in
`X-Slack-Signature` with the timestamp in `X-Slack-Request-Timestamp`.

Slack expects an HTTP 2xx within 3 seconds. For the Events API it retries a failed delivery up
to three times, with `X-Slack-Retry-Num: 1..3` and `X-Slack-Retry-Reason` (`http_timeout`,
`http_error`, `connection_failed`); real Slack waits ~immediately, 1 min and 5 min, here the
waits are `retry_delays` so tests can use short ones. Slash commands and interactivity payloads
are never retried by Slack (the user sees an error instead), so they get one attempt.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from dataclasses import dataclass, field

from slack_sdk.signature import SignatureVerifier


@dataclass
class Attempt:
    """One HTTP request to the bot."""

    retry_num: int | None
    retry_reason: str | None
    status: int | None  # None when there was no HTTP answer (timeout, refused)
    error: str | None  # http_timeout / http_error / connection_failed, or None on success


@dataclass
class DeliveryResult:
    """What the bot answered to the last attempt, and how many attempts it took."""

    status: int | None
    body: bytes
    headers: dict[str, str]
    attempts: int
    history: list[Attempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        """The answer body parsed as JSON; None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body.strip() else None
        except ValueError:
            return None


def signed_headers(
    *,
    signing_secret: str,
    body: bytes,
    content_type: str,
    timestamp: int | None = None,
    forge_signature: bool = False,
) -> dict[str, str]:
    """Headers Slack sends with a request; `forge_signature` signs with the wrong secret."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    secret = signing_secret + "-forged" if forge_signature else signing_secret
    signature = SignatureVerifier(secret).generate_signature(timestamp=str(timestamp), body=body)
    return {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": str(timestamp),
        "X-Slack-Signature": signature,
        "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
    }


def post_once(
    *, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> tuple[int | None, bytes, dict[str, str], str | None]:
    """POST once. Returns (status, body, headers, error reason for a retry or None)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        status = response.status
        reason = None if 200 <= status < 300 else "http_error"
        return status, answer, dict(response.getheaders()), reason
    except TimeoutError:
        return None, b"", {}, "http_timeout"
    except OSError:
        return None, b"", {}, "connection_failed"
    finally:
        conn.close()


def encode_form(fields: dict) -> bytes:
    return urllib.parse.urlencode(fields).encode("utf-8")


def encode_payload(payload: dict) -> bytes:
    """Interactivity requests: one form field, `payload`, holding the JSON."""
    return encode_form({"payload": json.dumps(payload)})


class Deliverer:
    """Sends signed requests to `events_url` (read on every call: it may be set late)."""

    def __init__(
        self,
        *,
        signing_secret: str,
        events_url,
        ack_timeout: float,
        retry_delays: tuple[float, ...],
    ) -> None:
        self.signing_secret = signing_secret
        self._events_url = events_url  # a callable returning the current URL
        self.ack_timeout = ack_timeout
        self.retry_delays = tuple(retry_delays)

    def send(
        self,
        *,
        body: bytes,
        content_type: str,
        retry: bool,
        first_retry_num: int | None = None,
        first_retry_reason: str | None = None,
        forge_signature: bool = False,
        timestamp_offset: int = 0,
        extra_headers: dict[str, str] | None = None,
    ) -> DeliveryResult:
        url = self._events_url()
        if not url:
            raise RuntimeError(
                "SlackEmulator.events_url is not set: point it at the bot's /slack/events URL"
            )
        history: list[Attempt] = []
        retry_num, retry_reason = first_retry_num, first_retry_reason
        while True:
            headers = signed_headers(
                signing_secret=self.signing_secret,
                body=body,
                content_type=content_type,
                timestamp=int(time.time()) + timestamp_offset,
                forge_signature=forge_signature,
            )
            if retry_num is not None:
                headers["X-Slack-Retry-Num"] = str(retry_num)
                headers["X-Slack-Retry-Reason"] = retry_reason or "http_timeout"
            headers.update(extra_headers or {})
            status, answer, answer_headers, error = post_once(
                url=url, body=body, headers=headers, timeout=self.ack_timeout
            )
            history.append(Attempt(retry_num, retry_reason, status, error))
            done_retries = len(history) - 1
            if error is None or not retry or done_retries >= len(self.retry_delays):
                return DeliveryResult(status, answer, answer_headers, len(history), history)
            time.sleep(self.retry_delays[done_retries])
            retry_num = (retry_num or 0) + 1
            retry_reason = error
