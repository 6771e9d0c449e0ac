"""S3 fetch stage: allow-list, size limit before download, retries; bytes out."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from workers import metrics
from workers.config import LimitsConfig, S3Config
from workers.contract import ErrorCode, Rejected, describe
from workers.retry import backoff_s
from workers.s3 import ImageRef, parse_image_ref

log = logging.getLogger(__name__)


# --- the fetch stage --------------------------------------------------------------------------

# S3 error codes, grouped by what we do about them.
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
# NoSuchBucket is object_not_found: the bucket already passed the allow-list, so a missing one
# means the object is not there (a typo'd or deleted bucket), not that we lack permission. A
# server that hides buckets from us answers 403 instead, which is access_denied.
_NO_BUCKET_CODES = {"NoSuchBucket"}
_DENIED_CODES = {
    "403",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AccountProblem",
}
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "PreconditionFailed",  # the object changed between our HEAD and GET: read it again
    "429",
    "412",
}
_MAX_BACKOFF_S = 5.0
_THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests"}
# Anything that looks like a signature or credential in a message is cut out (belt and braces:
# we build messages from codes, but exception texts are included for transport errors).
_CREDENTIAL_PATTERNS = re.compile(
    r"(X-Amz-(Credential|Signature|Security-Token)=)[^&\s'\"]+|(Credential=)[^,\s'\"]+|(Signature=)[0-9a-fA-F]+",
)


@dataclass(frozen=True)
class Fetched:
    ref: ImageRef
    data: bytes
    etag: str | None
    attempts: int
    elapsed_ms: float


class _Retryable(Exception):
    """A transient failure: try again while the retry budget lasts, else fetch_failed with this reason."""

    def __init__(self, reason: str, kind: str = "transient"):
        super().__init__(reason)
        self.kind = kind  # the label of captioner_fetch_retries_total


class _RedirectRefused(Exception):
    """The server answered 3xx; raised from botocore's needs-retry event, before its region redirector."""

    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


_REFUSE_REDIRECTS_ID = "captioner-refuse-redirects"


def _refuse_redirects(response: Any = None, **_: Any) -> None:
    """needs-retry hook: any 3xx ends the call.

    urllib3 never follows Location for botocore, but botocore's S3 region redirector re-sends a
    request after a 301/302/307 (re-signed for the region the answer names) and, when the
    answer names none, asks the same server with HeadBucket, which is redirected again: a server
    that always redirects drives it into RecursionError. Raising here, in the first handler,
    stops the call before the redirector runs.
    """
    http_response = response[0] if response else None
    status = getattr(http_response, "status_code", 0) or 0
    if 300 <= status < 400:
        raise _RedirectRefused(status)


class Fetcher:
    """S3 reference → bytes, or Rejected with the contract's error code.

    Thread-safe: boto3 clients are, and the only other shared state (the jitter RNG) is locked.
    """

    def __init__(
        self,
        client: Any,
        s3_cfg: S3Config,
        limits: LimitsConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ):
        self.client = client
        self.cfg = s3_cfg
        self.limits = limits
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._secrets = _client_secrets(client)
        # Idempotent (unique_id): several fetchers may share one client.
        client.meta.events.register_first("needs-retry.s3", _refuse_redirects, unique_id=_REFUSE_REDIRECTS_ID)

    def fetch(self, uri: str) -> Fetched:
        """Transient failures (5xx, throttling, timeouts, dropped or cut connections) are retried
        with backoff and jitter until `s3.retry_budget_s` is spent (or `s3.max_attempts`, when
        set); only then is the request `fetch_failed`. Every attempt has a total deadline."""
        ref = parse_image_ref(uri, self.cfg.allowed_buckets)
        started = time.monotonic()
        budget_ends = started + self.cfg.retry_budget_s
        last_reason = "no attempt made"
        attempt = 0
        while True:
            attempt += 1
            try:
                data, etag = self._fetch_once(ref, deadline=time.monotonic() + self.cfg.fetch_deadline_s)
            except _Retryable as e:
                last_reason = self._redact(str(e))
                metrics.FETCH_RETRIES.labels(e.kind).inc()
                delay = self._backoff_s(attempt)
                out_of_tries = self.cfg.max_attempts is not None and attempt >= self.cfg.max_attempts
                if out_of_tries or time.monotonic() + delay > budget_ends:
                    break
                log.debug("fetch %s attempt %d failed: %s; retrying in %.2f s", ref.uri, attempt, last_reason, delay)
                self._sleep(delay)
                continue
            return Fetched(ref, data, etag, attempt, (time.monotonic() - started) * 1000)
        raise Rejected(
            ErrorCode.FETCH_FAILED,
            f"{ref.uri}: gave up after {attempt} attempt(s) in {time.monotonic() - started:.1f} s; "
            f"last error: {last_reason}",
            attempts=attempt,
        )

    def _fetch_once(self, ref: ImageRef, *, deadline: float) -> tuple[bytes, str | None]:
        limit = self.limits.max_object_bytes
        # HEAD first: an oversized object is refused without transferring its body.
        head = self._call(ref, self.client.head_object, Bucket=ref.bucket, Key=ref.key)
        size = int(head.get("ContentLength", 0))
        if size > limit:
            raise Rejected(
                ErrorCode.OBJECT_TOO_LARGE,
                f"{ref.uri} is {size} bytes, over limits.max_object_bytes ({limit})",
            )
        etag = head.get("ETag")
        extra = {"IfMatch": etag} if etag else {}
        response = self._call(ref, self.client.get_object, Bucket=ref.bucket, Key=ref.key, **extra)
        body = response["Body"]
        try:
            # Read at most limit+1 bytes: the object may have grown since the HEAD.
            data = _read_up_to(body, limit + 1, deadline=deadline)
        except _Retryable:
            raise
        except Exception as e:
            raise _Retryable(f"reading body: {describe(e)}", "truncated") from None
        finally:
            body.close()
        if len(data) > limit:
            raise Rejected(
                ErrorCode.OBJECT_TOO_LARGE,
                f"{ref.uri} grew past limits.max_object_bytes ({limit}) while being read",
            )
        expected = response.get("ContentLength")
        if expected is not None and len(data) != int(expected):
            raise _Retryable(f"body cut short: {len(data)} of {expected} bytes", "truncated")
        return data, response.get("ETag", etag)

    def _call(self, ref: ImageRef, operation: Callable[..., Any], **kwargs: Any) -> Any:
        """One S3 call; every failure becomes Rejected (final) or _Retryable."""
        try:
            return operation(**kwargs)
        except ClientError as e:
            raise self._classify(ref, e) from None
        except _RedirectRefused as e:
            raise Rejected(ErrorCode.FETCH_FAILED, f"{ref.uri}: redirect not followed: {e}") from None
        except NoCredentialsError:
            raise Rejected(ErrorCode.ACCESS_DENIED, f"{ref.uri}: no S3 credentials configured") from None
        except (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError) as e:
            raise _Retryable(describe(e), "connection") from None

    def _classify(self, ref: ImageRef, e: ClientError) -> Exception:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        what = f"{code or 'HTTP'} (HTTP {status})"
        if code in _NOT_FOUND_CODES or code in _NO_BUCKET_CODES or (status == 404 and not code):
            return Rejected(ErrorCode.OBJECT_NOT_FOUND, f"{ref.uri} does not exist: {what}")
        if code in _DENIED_CODES or status in (401, 403):
            return Rejected(ErrorCode.ACCESS_DENIED, f"{ref.uri}: access denied: {what}")
        if status >= 500 or code in _RETRYABLE_CODES or status in (408, 412, 429):
            throttled = code in _THROTTLING_CODES or status in (429, 503)
            return _Retryable(what, "throttled" if throttled else "server_error")
        if 300 <= status < 400:
            return Rejected(ErrorCode.FETCH_FAILED, f"{ref.uri}: redirect not followed: {what}")
        return Rejected(ErrorCode.FETCH_FAILED, f"{ref.uri}: {what}")

    def _backoff_s(self, attempt: int) -> float:
        with self._rng_lock:  # this fetcher's seeded generator: repeatable delays in tests
            return backoff_s(attempt, self.cfg.backoff_s, _MAX_BACKOFF_S, self._rng.uniform)

    def _redact(self, text: str) -> str:
        text = _CREDENTIAL_PATTERNS.sub(lambda m: (m.group(1) or m.group(3) or m.group(4)) + "<redacted>", text)
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text


def _read_up_to(body: Any, limit: int, *, deadline: float) -> bytes:
    """At most `limit` bytes of a streaming body, giving up at `deadline`.

    The socket's read timeout bounds one read only, so a server that drips a byte a second holds
    a plain `read()` for as long as it likes. `read1` returns what one socket read brought,
    which lets the deadline be checked between reads.
    """
    raw = getattr(body, "_raw_stream", None)
    read = raw.read1 if raw is not None and hasattr(raw, "read1") else body.read
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        if time.monotonic() > deadline:
            raise _Retryable(
                f"body not read within the fetch deadline ({len(b''.join(chunks))} bytes so far)", "deadline"
            )
        chunk = read(min(remaining, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _client_secrets(client: Any) -> list[str]:
    """The client's key strings, so no message can echo them (best effort: private API)."""
    try:
        creds = client._request_signer._credentials.get_frozen_credentials()
    except Exception:
        return []
    return [s for s in (creds.access_key, creds.secret_key, creds.token) if s]
