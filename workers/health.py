"""Liveness and readiness of an ingest process, from progress rather than from a port answering.

A process whose /metrics answers can still be dead where it matters: a poll loop stuck in a
call, or a record whose outcome never arrives so its partition's commit stops moving. So:

- live   = the poll loop came round within `max_poll_gap_s` AND the commit watermark moved
           within `max_stall_s` whenever records were open (`stalled_s`: how long the oldest open
           record has held the watermark back). Failing it makes Kubernetes restart the pod; the
           group rebalances and the open records are redelivered (at least once, nothing lost).
- ready  = the loop has polled at least once, and is live.

An inference outage pauses partitions but keeps the loop polling, and each retried record is
still open, so `max_stall_s` must exceed the ingest's inference retry budget (prod: 900 s):
an outage of the GPU tier does not crash-loop the CPU tier.

Feed it from the source's poll loop: `health.polled(open_records)` every iteration and
`health.committed(open_records)` after a commit that moved a watermark. Thread-safe; no I/O.
`serve_health` exposes GET /livez and /readyz (200 or 503, with the reasons as JSON).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Health:
    def __init__(
        self, *, max_poll_gap_s: float = 60.0, max_stall_s: float = 900.0, clock: Callable[[], float] = time.monotonic
    ):
        self.max_poll_gap_s = max_poll_gap_s
        self.max_stall_s = max_stall_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_poll: float | None = None
        self._open_since: float | None = None  # the watermark has not moved since, with records open

    def polled(self, open_records: int) -> None:
        now = self._clock()
        with self._lock:
            self._last_poll = now
            if open_records == 0:
                self._open_since = None
            elif self._open_since is None:
                self._open_since = now

    def committed(self, open_records: int) -> None:
        """A commit moved a watermark: the oldest open record is a newer one (or there is none)."""
        with self._lock:
            self._open_since = self._clock() if open_records else None

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            since_poll = None if self._last_poll is None else now - self._last_poll
            stalled = 0.0 if self._open_since is None else now - self._open_since
        problems = []
        if since_poll is not None and since_poll > self.max_poll_gap_s:
            problems.append(f"no poll for {since_poll:.0f} s (max {self.max_poll_gap_s:.0f} s)")
        if stalled > self.max_stall_s:
            problems.append(
                f"commit watermark stuck for {stalled:.0f} s with records open (max {self.max_stall_s:.0f} s)"
            )
        return {
            "live": not problems,
            "ready": since_poll is not None and not problems,
            "seconds_since_poll": since_poll,
            "stalled_s": stalled,
            "problems": problems,
        }


def serve_health(health: Health, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """GET /livez and /readyz on a daemon thread; port 0 picks a free one (server.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state = health.snapshot()
            key = {"/livez": "live", "/readyz": "ready"}.get(self.path.split("?")[0])
            if key is None:
                self.send_error(404)
                return
            body = json.dumps(state).encode()
            self.send_response(200 if state[key] else 503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
