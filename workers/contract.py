"""The message contract: requests in, results and dead letters out (see README, "Message contract").

Pure data and parsing: no Kafka, S3 or model calls. Every stage reports a failure by raising
`Rejected(code, message)`; the pipeline turns it into a dead letter.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, TypeVar

from pydantic import ValidationError

from workers.config import LimitsConfig
from workers.params import GenerationParams

# A dead letter echoes at most this much of the original value.
MAX_ECHO_BYTES = 64 * 1024

T = TypeVar("T")


class ErrorCode(StrEnum):
    INVALID_MESSAGE = "invalid_message"
    FORBIDDEN_REFERENCE = "forbidden_reference"
    OBJECT_NOT_FOUND = "object_not_found"
    ACCESS_DENIED = "access_denied"
    OBJECT_TOO_LARGE = "object_too_large"
    FETCH_FAILED = "fetch_failed"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    INFERENCE_FAILED = "inference_failed"


class Rejected(Exception):
    """A request that cannot be captioned, with the stage's reason."""

    def __init__(self, code: ErrorCode, message: str, *, attempts: int = 1):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts  # tries the stage made before giving up


def run_stage(code: ErrorCode, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one stage; an exception it did not classify itself becomes that stage's code."""
    try:
        return fn(*args, **kwargs)
    except Rejected:
        raise
    except Exception as e:
        raise Rejected(code, describe(e)) from e


def describe(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, bounded: what an error record says about an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Source:
    topic: str
    partition: int
    offset: int

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass
class Request:
    """One parsed request. `id` may repeat; `source` is what identifies it."""

    id: str
    image: str
    params: GenerationParams
    metadata: dict[str, Any] = field(default_factory=dict)
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    source: Source | None = None


def parse_request(
    value: bytes | None,
    *,
    defaults: GenerationParams,
    limits: LimitsConfig,
    key: bytes | None = None,
    headers: Headers | None = None,
    source: Source | None = None,
) -> Request:
    """A Kafka value → Request, or Rejected(invalid_message) saying what is wrong.

    The reference is not checked against the allow-list here (that is the fetch stage's job, so
    the HTTP path and the Kafka path share it); only its type is.
    """
    size = record_size(value, key, headers or [])
    if size > limits.max_message_bytes:
        raise Rejected(
            ErrorCode.INVALID_MESSAGE,
            f"record of {size} bytes (key, headers and value) exceeds limits.max_message_bytes "
            f"({limits.max_message_bytes})",
        )
    for name, _ in headers or []:
        if not is_utf8(name):
            raise Rejected(ErrorCode.INVALID_MESSAGE, f"header key {short_repr(name)} is not UTF-8")
    if value is None:
        raise Rejected(ErrorCode.INVALID_MESSAGE, "tombstone (null value) is not a request")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(ErrorCode.INVALID_MESSAGE, "value is not UTF-8") from None
    stripped = text.strip()
    if not stripped:
        raise Rejected(ErrorCode.INVALID_MESSAGE, "empty value")
    if not stripped.startswith(("{", '"', "[")):
        body: Any = stripped  # a bare reference
    else:
        try:
            body = json.loads(stripped, parse_constant=_reject_non_finite)
        except json.JSONDecodeError as e:
            raise Rejected(ErrorCode.INVALID_MESSAGE, f"not valid JSON: {e.msg} at position {e.pos}") from None
        except RecursionError:
            raise Rejected(ErrorCode.INVALID_MESSAGE, "JSON nested too deeply") from None
    where = unencodable_text(body)
    if where is not None:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"{where} holds a lone surrogate (\\ud800-\\udfff escape): not text")
    return request_from_body(body, defaults=defaults, limits=limits, key=key, headers=headers, source=source)


def _reject_non_finite(name: str) -> Any:
    # Python's json accepts NaN and ±Infinity; strict consumers of our results do not.
    raise Rejected(ErrorCode.INVALID_MESSAGE, f"{name} is not a JSON number: non-finite numbers are not allowed")


def is_utf8(text: str) -> bool:
    try:
        str.encode(text, "utf-8")  # str's own: a subclass may encode leniently
    except UnicodeEncodeError:
        return False
    return True


def unencodable_text(body: Any) -> str | None:
    """Where a decoded JSON body holds a string that is not valid Unicode text (a lone
    surrogate from a `\\udXXX` escape), as a path like `metadata.tags[2]`; None when it holds none."""
    stack: list[tuple[str, Any]] = [("value", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            if not is_utf8(node):
                return path
        elif isinstance(node, dict):
            for k, v in node.items():
                if not is_utf8(k):
                    return f"a key in {path}"
                stack.append((k if path == "value" else f"{path}.{k}", v))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
    return None


def record_size(value: bytes | None, key: bytes | None, headers: Headers) -> int:
    """What a record carries: key, header keys and values, and value, in bytes."""
    header_bytes = sum(len(str.encode(k, "utf-8", "surrogateescape")) + len(v or b"") for k, v in headers)
    return len(value or b"") + len(key or b"") + header_bytes


def producible_headers(headers: Headers) -> list[tuple[str, bytes]]:
    """The headers an outcome copies from its request.

    The rule: a header whose value is null, or whose key is not UTF-8, is dropped — the producer
    cannot write either (kafka-python writes header values as bytes and keys as UTF-8).
    """
    return [(k, v) for k, v in headers if v is not None and is_utf8(k)]


def request_from_body(
    body: Any,
    *,
    defaults: GenerationParams,
    limits: LimitsConfig,
    key: bytes | None = None,
    headers: Headers | None = None,
    source: Source | None = None,
) -> Request:
    """A decoded JSON body (object or bare string) → Request; shared with the HTTP ingress."""
    if isinstance(body, str):
        body = {"image": body}
    if not isinstance(body, dict):
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"expected a JSON object or string, got {type(body).__name__}")
    unknown = set(body) - {"id", "image", "params", "metadata"}
    if unknown:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"unknown field(s): {', '.join(sorted(unknown))}")
    image = body.get("image")
    if not isinstance(image, str) or not image.strip():
        raise Rejected(ErrorCode.INVALID_MESSAGE, "field 'image' is missing or not a non-empty string")
    image = image.strip()
    req_id = body.get("id", image)
    if not isinstance(req_id, str):
        raise Rejected(ErrorCode.INVALID_MESSAGE, "field 'id' must be a string")
    metadata = body.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise Rejected(ErrorCode.INVALID_MESSAGE, "field 'metadata' must be an object")
    overrides = body.get("params")
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise Rejected(ErrorCode.INVALID_MESSAGE, "field 'params' must be an object")
    params = resolve_params(defaults, overrides, limits)
    return Request(
        id=req_id,
        image=image,
        params=params,
        metadata=metadata,
        key=key,
        headers=list(headers or []),
        source=source,
    )


def resolve_params(defaults: GenerationParams, overrides: dict[str, Any], limits: LimitsConfig) -> GenerationParams:
    """Defaults with a request's overrides, validated and capped, or Rejected(invalid_message)."""
    try:
        params = defaults.with_overrides(overrides)
        limits.check_params(params)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in e.errors(include_url=False)
        )
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"invalid params: {problems}") from None
    except ValueError as e:
        raise Rejected(ErrorCode.INVALID_MESSAGE, f"invalid params: {e}") from None
    return params


def result_record(
    request: Request,
    *,
    captions: list[str],
    model: dict[str, Any],
    cached: bool,
    width: int,
    height: int,
    timings_ms: dict[str, float],
    scores: list[float] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": request.id,
        "image": request.image,
        "caption": captions[0] if captions else "",
        "model": model,
        "params": request.params.model_dump(),
        "metadata": request.metadata,
        "cached": cached,
        "source": request.source.as_dict() if request.source else None,
        "width": width,
        "height": height,
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()},
    }
    if len(captions) > 1:
        record["captions"] = captions
    if scores is not None:
        record["scores"] = scores
    return record


def dead_letter_record(
    *,
    code: ErrorCode,
    message: str,
    value: bytes | None,
    source: Source | None,
    attempts: int,
    request_id: str | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        # A message may quote the request (an exception's text): keep it encodable.
        "error": {"code": str(code), "message": message.encode("utf-8", "replace").decode("utf-8")},
        "source": source.as_dict() if source else None,
        "attempts": attempts,
    }
    if request_id is not None:
        record["id"] = request_id
    if value is None:
        record["request"] = None
        record["request_encoding"] = None
    else:
        echoed = value[:MAX_ECHO_BYTES]
        try:
            record["request"] = echoed.decode("utf-8")
            record["request_encoding"] = "utf-8"
        except UnicodeDecodeError:
            record["request"] = base64.b64encode(echoed).decode("ascii")
            record["request_encoding"] = "base64"
        if len(value) > MAX_ECHO_BYTES:
            record["request_truncated"] = True
            record["request_bytes"] = len(value)
    return record


@dataclass(frozen=True)
class Result:
    """A caption for a request: published to the results topic, keyed like the request."""

    record: dict[str, Any]
    key: bytes | None
    headers: list[tuple[str, bytes]]

    @classmethod
    def for_request(cls, request: Request, record: dict[str, Any]) -> Result:
        # The request's key, else its id: one id keeps its partition on the results topic.
        key = request.key if request.key is not None else request.id.encode("utf-8")
        return cls(record, key, producible_headers(request.headers))

    @cached_property
    def value(self) -> bytes:
        """The record as standard JSON; ValueError/UnicodeError when it cannot be (see compact_dead_letter)."""
        return encode(self.record)


@dataclass(frozen=True)
class DeadLetter:
    """A request that cannot be captioned: published to the dead-letter topic with its reason."""

    code: ErrorCode
    record: dict[str, Any]
    key: bytes | None
    headers: list[tuple[str, bytes]]

    @cached_property
    def value(self) -> bytes:
        return encode(self.record)


Outcome = Result | DeadLetter

# A compact dead letter keeps the original key only up to this size: it must fit any topic.
MAX_COMPACT_KEY_BYTES = 1024


def dead_letter(
    error: Rejected,
    *,
    value: bytes | None,
    key: bytes | None,
    headers: Headers,
    source: Source | None,
    request: Request | None,
    attempts: int | None = None,
) -> DeadLetter:
    """The dead letter for a record: the original key (else the request's id) and headers."""
    record = dead_letter_record(
        code=error.code,
        message=error.message,
        value=value,
        source=source,
        attempts=attempts if attempts is not None else error.attempts,
        request_id=request.id if request else None,
    )
    if key is None and request is not None:
        key = request.id.encode("utf-8")
    return DeadLetter(error.code, record, key, producible_headers(headers))


def compact_dead_letter(
    code: ErrorCode, message: str, *, value: bytes | None, key: bytes | None, source: Source | None
) -> DeadLetter:
    """The fallback when a record's own outcome cannot be encoded or produced: no echo of what
    the request carried beyond its original bytes (base64), no headers, a short key or none.
    Always encodable and small, so every consumed record still ends as one outcome."""
    record = dead_letter_record(code=code, message=message, value=None, source=source, attempts=1)
    if value is not None:
        echoed = value[:MAX_ECHO_BYTES]
        record["request"] = base64.b64encode(echoed).decode("ascii")
        record["request_encoding"] = "base64"
        if len(value) > MAX_ECHO_BYTES:
            record["request_truncated"] = True
            record["request_bytes"] = len(value)
    short_key = key if key is not None and len(key) <= MAX_COMPACT_KEY_BYTES else None
    return DeadLetter(code, record, short_key, [])


def encode(record: dict[str, Any]) -> bytes:
    """Standard JSON in UTF-8: NaN/Infinity and lone surrogates raise instead of being written."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def short_repr(value: Any, limit: int = 120) -> str:
    """repr() bounded: what an error message may quote of untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
