"""The inference tier over HTTP: a stand-in for a Serve handle that the ingest uses without Ray.

`HttpReplicas(url)` has the surface the pipeline's `ReplicaClient` uses on a DeploymentHandle:

    answers = await replicas.caption_many.remote(items)   # list[ReplicaAnswer], in order
    info = replicas.info.remote().result()                # ReplicaInfo (blocking)

Calls go to the Serve application's batch endpoint through Serve's proxies (in Kubernetes the
`captioner-serve-svc` Service), one HTTP request per micro-batch, in the frame of
`workers/replica_wire.py`. Failure semantics, which decide whether a record can be lost:

- a failed generate for a params group comes back in-band, as that answer's `error` (HTTP 200);
  the pipeline turns it into `inference_failed` for those images only;
- everything about the transport — connection refused or reset, a timeout, Serve's 503
  backpressure, a 5xx or 404 while an upgrade moves the app — raises `ReplicasUnavailable`:
  transient, so the caller pauses and retries with backoff and never dead-letters for it;
- a 400/413/422 means our frame was refused as malformed: `ReplicaCallRejected`, not transient.

Imports neither torch nor ray (tests/test_replica_http.py checks), so an ingest pod's image
needs neither.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import aiohttp

from workers.replica_api import ReplicaAnswer, ReplicaInfo, ReplicasUnavailable
from workers.replica_wire import (
    BATCH_PATH,
    CONTENT_TYPE,
    INFO_PATH,
    FrameError,
    Item,
    decode_answers,
    decode_info,
    encode_batch,
)

log = logging.getLogger(__name__)

# The frame was refused as malformed: retrying the same bytes cannot help.
_NOT_TRANSIENT = {400, 413, 422}


class ReplicaCallRejected(RuntimeError):
    """The endpoint refused the call itself (malformed frame, too large): not transient."""


class _Remote:
    """`x.remote(...)`, as on a Serve handle's method."""

    def __init__(self, fn: Any):
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


class _Done:
    """`.result()` on an already computed value, as on a DeploymentResponse."""

    def __init__(self, fn: Any):
        self._fn = fn

    def result(self, timeout_s: float | None = None) -> Any:
        return self._fn(timeout_s)


class HttpReplicas:
    """The replicas behind a Serve proxy at `url` (e.g. http://captioner-serve-svc:8000)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        info_wait_s: float = 600.0,
    ):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.info_wait_s = info_wait_s
        self._headers = {"authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.caption_many = _Remote(self._caption_many)
        self.info = _Remote(lambda: _Done(self._wait_for_info))
        self.bytes_sent = 0
        self.calls = 0

    # -- the batch call -----------------------------------------------------------------------

    def _session_here(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
            # One pooled session per loop; no connection limit beyond the caller's own window.
            self._session = aiohttp.ClientSession(
                timeout=timeout, headers=self._headers, connector=aiohttp.TCPConnector(limit=0)
            )
            self._loop = loop
        return self._session

    async def _caption_many(self, items: Sequence[Item]) -> list[ReplicaAnswer]:
        body = encode_batch(items)
        session = self._session_here()
        try:
            async with session.post(
                self.url + BATCH_PATH, data=body, headers={"content-type": CONTENT_TYPE}
            ) as response:
                payload = await response.read()
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ReplicasUnavailable(f"{BATCH_PATH}: {type(e).__name__}: {e}".rstrip(": ")) from None
        self.bytes_sent += len(body)
        self.calls += 1
        if status == 200:
            try:
                return decode_answers(json.loads(payload), len(items))
            except (ValueError, KeyError, TypeError, FrameError) as e:
                raise ReplicaCallRejected(f"unreadable answer from {BATCH_PATH}: {e}") from None
        detail = payload[:200].decode("utf-8", "replace")
        if status in _NOT_TRANSIENT:
            raise ReplicaCallRejected(f"{BATCH_PATH} refused the call: HTTP {status} {detail}")
        raise ReplicasUnavailable(f"{BATCH_PATH}: HTTP {status} {detail}")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def close(self) -> None:
        """Close the connection pool from outside its loop (after the pipeline stopped)."""
        loop, session = self._loop, self._session
        if session is None or loop is None or loop.is_closed():
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=5)
        else:
            loop.run_until_complete(self.aclose())

    # -- info: what the ingest needs before it reads a record ---------------------------------

    def fetch_info(self, timeout_s: float = 10.0) -> ReplicaInfo:
        """One GET of the replicas' info; ReplicasUnavailable if the tier is not answering."""
        req = urllib.request.Request(self.url + INFO_PATH, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                return decode_info(json.loads(response.read()))
        except urllib.error.HTTPError as e:
            raise ReplicasUnavailable(f"{INFO_PATH}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise ReplicasUnavailable(f"{INFO_PATH}: {e}") from None

    def _wait_for_info(self, timeout_s: float | None = None) -> ReplicaInfo:
        """Retry with backoff and jitter while the tier starts (a cold GPU node takes minutes)."""
        deadline = time.monotonic() + (self.info_wait_s if timeout_s is None else timeout_s)
        delay = 0.1
        while True:
            try:
                return self.fetch_info()
            except ReplicasUnavailable as e:
                if time.monotonic() + delay > deadline:
                    raise ReplicasUnavailable(f"{self.url} did not answer in time: {e}") from None
                log.info("inference tier not ready (%s); retrying in %.1f s", e, delay)
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
