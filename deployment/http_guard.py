"""The HTTP ingress's guards: bearer-token auth, admission limits, a capped body reader and JSON
answers that cannot fail to encode. Pure Starlette/FastAPI pieces, no Serve: `deployment.app`'s
CaptionIngress applies them (README, "HTTP API").

- Tokens come from `http.auth_tokens` (CAPTIONER_HTTP__AUTH_TOKENS, a JSON list, environment only)
  and the lines of `http.auth_tokens_file`; a presented token is compared with every one of them
  by `hmac.compare_digest`, with no early exit, and is never logged.
- Admission is per ingress replica and does not queue: over `http.max_concurrent_requests`
  requests or `http.max_body_bytes_in_flight` body bytes, a request is refused at once (429,
  Retry-After) so that waiting uploads cannot pile up in memory. A single body larger than the
  whole byte budget (up to `limits.max_http_body_bytes`) is admitted when it is the only one.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from workers.config import ConfigError, Settings
from workers.contract import ErrorCode, Rejected
from workers.contract import Request as CaptionRequest

RETRY_AFTER_S = "1"
MIN_TOKEN_CHARS = 16


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail to encode: non-finite floats become null and strings are ASCII-
    escaped, so a lone surrogate or a NaN that slipped past validation cannot turn an answer
    into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error_response(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def ensure_encodable(req: CaptionRequest) -> None:
    """What the caller gave (id, params, metadata) must survive the answer's JSON: strict UTF-8
    (no lone surrogates) and finite numbers, else the request is invalid_message."""
    try:
        json.dumps(
            [req.id, req.image, req.metadata, req.params.model_dump(mode="python")], ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as e:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"not representable as strict JSON: {type(e).__name__}") from None


def load_tokens(settings: Settings) -> list[bytes]:
    """The accepted bearer tokens: the environment's (http.auth_tokens) and the file's lines."""
    tokens = [t.encode() for t in settings.http.token_strings()]
    if any(len(t) < MIN_TOKEN_CHARS for t in tokens):
        raise ConfigError(
            "http auth",
            [
                {
                    "loc": ("http", "auth_tokens_file"),
                    "input": None,
                    "msg": f"each token must be at least {MIN_TOKEN_CHARS} characters",
                }
            ],
        )
    return tokens


def bearer_ok(header: str | None, tokens: list[bytes]) -> bool:
    """Constant-time match of `Bearer <token>` against every token (no early exit on a match)."""
    if not header or not tokens:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = presented.strip().encode("latin-1", "replace")  # Starlette decodes headers as latin-1
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    return matched


class Overloaded(Exception):
    """This replica is at a limit now: 429, try again."""


class Admission:
    """Per-replica limits on requests and body bytes in flight (one event loop: no lock)."""

    def __init__(self, max_requests: int, max_body_bytes: int):
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.requests = 0
        self.body_bytes = 0

    @contextmanager
    def request(self) -> Iterator[BodyAllowance]:
        """A request slot, with its body allowance; both are given back when the answer is made."""
        if self.requests >= self.max_requests:
            raise Overloaded(f"{self.requests} requests in progress (http.max_concurrent_requests)")
        self.requests += 1
        allowance = BodyAllowance(self)
        try:
            yield allowance
        finally:
            self.requests -= 1
            self.body_bytes -= allowance.held


class BodyAllowance:
    """The body bytes one request holds of its replica's budget."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.held = 0

    def grow_to(self, nbytes: int) -> None:
        """Hold `nbytes` in all. A body bigger than the whole budget is let in only while no
        other body is held (it has the budget to itself), so it is never refused forever."""
        extra = nbytes - self.held
        if extra <= 0:
            return
        admission = self.admission
        others = admission.body_bytes - self.held
        if admission.body_bytes + extra > admission.max_body_bytes and others > 0:
            raise Overloaded(
                f"request bodies in flight would exceed http.max_body_bytes_in_flight ({admission.max_body_bytes})"
            )
        admission.body_bytes += extra
        self.held = nbytes


async def read_capped(request: Request, limit: int, allowance: BodyAllowance) -> bytes:
    """The body, refused over `limit` bytes before reading where the size is declared, and held
    against the replica's body budget (the declared size up front, else chunk by chunk)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise Rejected(
                ErrorCode.OBJECT_TOO_LARGE, f"body of {declared} bytes exceeds limits.max_http_body_bytes ({limit})"
            )
        allowance.grow_to(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads declare nothing: count as we go
            raise Rejected(ErrorCode.OBJECT_TOO_LARGE, f"body exceeds limits.max_http_body_bytes ({limit})")
        allowance.grow_to(size)
        chunks.append(chunk)
    return b"".join(chunks)
