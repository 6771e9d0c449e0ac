"""A fault-injecting HTTP proxy for tests and chaos runs: forwards to a real server (S3) and, by plan,
answers 500/503, delays, drops the connection, cuts a response body short or drips it; and, on
demand (`throttle_for`), answers every request 503 SlowDown for a while (a throttling burst).

Deterministic: faults are drawn from `random.Random(seed)` in the order requests arrive, and
`fail_first=N` fails exactly the first N matching requests. Loopback only.

    with ChaosProxy("127.0.0.1:8333", FaultPlan(fail_first=2)) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, ...)
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

log = logging.getLogger(__name__)

# Outcomes recorded per request.
FORWARDED = "forwarded"
ERROR = "error"
DELAYED = "delayed"
DROPPED = "dropped"
TRUNCATED = "truncated"
DRIPPED = "dripped"
THROTTLED = "throttled"  # answered 503 SlowDown during a throttling burst

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class FaultPlan:
    """What to do to requests that `applies_to(method, path)` (default: all).

    fail_first: the first N matching requests get `error_status`, then rates apply.
    Rates are probabilities per request, checked in the order error, drop, truncate, delay.
    """

    fail_first: int = 0
    error_rate: float = 0.0
    error_status: int = 503
    drop_rate: float = 0.0
    truncate_rate: float = 0.0
    delay_rate: float = 0.0
    delay_s: float = 0.5
    # A server that sends a GET's body `drip_bytes` at a time, `drip_interval_s` apart: every
    # socket read returns within any read timeout, yet the transfer takes as long as it likes.
    drip_rate: float = 0.0
    drip_bytes: int = 16
    drip_interval_s: float = 0.2
    applies_to: Callable[[str, str], bool] | None = None


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    outcome: str
    status: int | None
    body_bytes: int  # response body bytes sent to the client


@dataclass
class _State:
    plan: FaultPlan
    rng: random.Random
    matched: int = 0
    seen: list[Seen] = field(default_factory=list)
    throttled_until: float = 0.0  # time.monotonic(): every request is throttled before it


class ChaosProxy:
    def __init__(self, upstream: str, plan: FaultPlan | None = None, *, seed: int = 0, port: int = 0):
        host, _, port_text = upstream.removeprefix("http://").rstrip("/").rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port_text))
        self._lock = threading.Lock()
        self._state = _State(plan or FaultPlan(), random.Random(seed))
        # Called with (method, path) just before a request is forwarded (tests use it to change
        # the upstream object between two requests, deterministically).
        self.before_forward: Callable[[str, str], None] | None = None
        # Called with (method, path, response headers) to rewrite them (tests use it to make a
        # HEAD understate an object's size; request headers cannot change: SigV4 signs them).
        self.rewrite_response_headers: Callable[[str, str, list[tuple[str, str]]], list[tuple[str, str]]] | None = None
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve_connection(self.connection, self.rfile, self.wfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", port), Handler)
        self._thread: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_plan(self, plan: FaultPlan, *, seed: int | None = None) -> None:
        """Switch faults at run time; the matched-request count restarts for fail_first."""
        with self._lock:
            self._state.plan = plan
            self._state.matched = 0
            if seed is not None:
                self._state.rng = random.Random(seed)

    def throttle_for(self, seconds: float) -> None:
        """A throttling burst: every request (whatever the plan) gets 503 SlowDown for `seconds`."""
        with self._lock:
            self._state.throttled_until = time.monotonic() + seconds

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._state.seen)

    def counts(self) -> Counter[str]:
        return Counter(s.outcome for s in self.seen)

    def reset_log(self) -> None:
        with self._lock:
            self._state.seen.clear()

    def start(self) -> ChaosProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="chaos-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- per connection -----------------------------------------------------------------------

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            st = self._state
            plan = st.plan
            if time.monotonic() < st.throttled_until:
                return THROTTLED
            if plan.applies_to is not None and not plan.applies_to(method, path):
                return FORWARDED
            st.matched += 1
            if st.matched <= plan.fail_first:
                return ERROR
            for outcome, rate in (
                (ERROR, plan.error_rate),
                (DROPPED, plan.drop_rate),
                (TRUNCATED, plan.truncate_rate),
                (DRIPPED, plan.drip_rate if method == "GET" else 0.0),  # only a body can drip
                (DELAYED, plan.delay_rate),
            ):
                if rate > 0 and st.rng.random() < rate:
                    return outcome
            return FORWARDED

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._state.seen.append(seen)

    def _serve_connection(self, conn: socket.socket, rfile: BinaryIO, wfile: BinaryIO) -> None:
        while True:  # keep-alive: one request after another on this connection
            request = _read_request(rfile)
            if request is None:
                return
            method, path, headers, body = request
            outcome = self._decide(method, path)
            if outcome == DROPPED:
                self._record(Seen(method, path, DROPPED, None, 0))
                conn.shutdown(socket.SHUT_RDWR)
                return
            if outcome in (ERROR, THROTTLED):
                status = 503 if outcome == THROTTLED else self._state.plan.error_status
                payload = _s3_error_body(status)
                # Recorded before answering, so a client that got the answer sees it in `seen`.
                self._record(Seen(method, path, outcome, status, len(payload)))
                _write_response(wfile, status, [("Content-Type", "application/xml")], payload, method)
                continue
            if outcome == DELAYED:
                time.sleep(self._state.plan.delay_s)  # the fault itself is the delay
            if self.before_forward is not None:
                self.before_forward(method, path)
            try:
                status, resp_headers, resp_body = self._forward(method, path, headers, body)
            except OSError as e:
                log.debug("upstream failed for %s %s: %s", method, path, e)
                self._record(Seen(method, path, DROPPED, None, 0))
                conn.shutdown(socket.SHUT_RDWR)
                return
            if self.rewrite_response_headers is not None:
                resp_headers = self.rewrite_response_headers(method, path, resp_headers)
            if outcome == TRUNCATED and len(resp_body) > 1:
                # Promise the whole body, send half, hang up: a mid-transfer failure.
                half = resp_body[: len(resp_body) // 2]
                self._record(Seen(method, path, TRUNCATED, status, len(half)))
                _write_response(wfile, status, resp_headers, half, method, content_length=len(resp_body))
                conn.shutdown(socket.SHUT_RDWR)
                return
            if outcome == DRIPPED and method == "GET" and len(resp_body) > 1:
                self._record(Seen(method, path, DRIPPED, status, len(resp_body)))
                if not self._drip(wfile, status, resp_headers, resp_body):
                    with contextlib.suppress(OSError):  # the client gave up on it, and may be gone
                        conn.shutdown(socket.SHUT_RDWR)
                    return
                continue
            if outcome == DRIPPED:
                outcome = FORWARDED  # an empty body: nothing to drip
            self._record(Seen(method, path, outcome, status, 0 if method == "HEAD" else len(resp_body)))
            _write_response(wfile, status, resp_headers, resp_body, method)

    def _drip(self, wfile: BinaryIO, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        """Headers at once, then the body a few bytes at a time; False when the client hung up."""
        plan = self._state.plan
        _write_response(wfile, status, headers, b"", "GET", content_length=len(body))
        try:
            for start in range(0, len(body), plan.drip_bytes):
                wfile.write(body[start : start + plan.drip_bytes])
                wfile.flush()
                time.sleep(plan.drip_interval_s)
        except OSError:
            return False
        return True

    def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            # Headers go through unchanged (Host included): the client's SigV4 signature covers them.
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or method in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            resp_body = response.read()
            resp_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, resp_headers, resp_body
        finally:
            upstream.close()


def _read_request(rfile: BinaryIO) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    line = rfile.readline(65537)
    if not line:
        return None
    try:
        method, path, _version = line.decode("latin-1").strip().split(" ", 2)
    except ValueError:
        return None
    message = http.client.parse_headers(rfile)  # type: ignore[arg-type]
    headers = list(message.items())
    if "chunked" in (message.get("Transfer-Encoding") or "").lower():
        body = _read_chunked(rfile)
    else:
        body = rfile.read(int(message.get("Content-Length") or 0))
    return method, path, headers, body


def _read_chunked(rfile: BinaryIO) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        parts.append(rfile.read(size))
        rfile.readline()


def _write_response(
    wfile: BinaryIO,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    method: str,
    *,
    content_length: int | None = None,
) -> None:
    reason = http.client.responses.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"]
    has_length = False
    for name, value in headers:
        if name.lower() == "content-length":
            has_length = True
            if method != "HEAD":  # a HEAD keeps the object's length; others get what we send
                value = str(content_length if content_length is not None else len(body))
        lines.append(f"{name}: {value}")
    if not has_length:
        lines.append(f"Content-Length: {content_length if content_length is not None else len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    wfile.write(head + (b"" if method == "HEAD" else body))
    wfile.flush()


def _s3_error_body(status: int) -> bytes:
    code = {500: "InternalError", 503: "SlowDown"}.get(status, "ServiceUnavailable")
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by chaos proxy</Message></Error>"
    ).encode()
