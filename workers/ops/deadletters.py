"""Dead letters read back: the original request a dead-letter record carries, and what may be sent.

Pure: no Kafka. The record format is the contract's (`contract.dead_letter_record`, README
"Message contract"): `request` is the original value (`request_encoding` utf-8 or base64),
`request_truncated: true` when the echo was cut, the Kafka key and headers are the request's.
A replayed request is byte-for-byte the original value, with the original key and headers, plus
one header naming the dead letter it came from (`REPLAY_HEADER`, replacing an older one).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Value: b"<dead-letter topic>/<partition>/<offset>" of the dead letter a request was replayed from.
REPLAY_HEADER = "captioner-replay-of"


class NotReplayable(Exception):
    """A dead letter whose original request cannot be re-sent whole; the message says why."""


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic, as read."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    value: bytes | None

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def body(self) -> dict[str, Any]:
        """The JSON object of the record; NotReplayable when it is not one."""
        if self.value is None:
            raise NotReplayable("the dead-letter record itself is a tombstone")
        try:
            body = json.loads(self.value)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise NotReplayable("the dead-letter record is not JSON") from None
        if not isinstance(body, dict) or "error" not in body:
            raise NotReplayable("the dead-letter record has no 'error' (not a captioner dead letter)")
        return body

    def code(self) -> str | None:
        try:
            error = self.body().get("error")
        except NotReplayable:
            return None
        return error.get("code") if isinstance(error, dict) else None

    def request_id(self) -> str | None:
        try:
            value = self.body().get("id")
        except NotReplayable:
            return None
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Replay:
    """What to produce to the input topic for one dead letter."""

    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


def original_request(letter: DeadLetter) -> bytes:
    """The original request value, exactly; NotReplayable when the record cannot give it whole."""
    body = letter.body()
    if body.get("request_truncated"):
        size = body.get("request_bytes")
        raise NotReplayable(
            f"the echo was truncated ({size} bytes cut to the contract's 64 KiB); "
            "sending part of it would be a different request"
        )
    if "request" not in body:
        raise NotReplayable("the dead letter has no 'request' field")
    request, encoding = body["request"], body.get("request_encoding")
    if request is None:
        raise NotReplayable("the original request was a tombstone (null value): nothing to replay")
    if not isinstance(request, str):
        raise NotReplayable(f"'request' is a {type(request).__name__}, not a string")
    if encoding == "utf-8":
        try:
            return request.encode("utf-8")
        except UnicodeEncodeError:
            raise NotReplayable("'request' holds a lone surrogate and cannot be UTF-8") from None
    if encoding == "base64":
        try:
            return base64.b64decode(request, validate=True)
        except (binascii.Error, ValueError):
            raise NotReplayable("'request' is not valid base64") from None
    raise NotReplayable(f"unknown request_encoding {encoding!r}")


def replay_of(letter: DeadLetter) -> Replay:
    """The record to produce; NotReplayable when it cannot be produced exactly."""
    value = original_request(letter)
    headers: list[tuple[str, bytes]] = []
    for name, header_value in letter.headers:
        if name == REPLAY_HEADER:
            continue  # an earlier replay's: this one names the newer dead letter
        if header_value is None:
            # kafka-python reads such a header but cannot send it (FIELD-NOTES).
            raise NotReplayable(f"header {name!r} has a null value, which the client cannot re-send")
        headers.append((name, header_value))
    headers.append((REPLAY_HEADER, letter.coordinates.encode("utf-8")))
    return Replay(value=value, key=letter.key, headers=headers)


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to replay: every given set must contain the letter's value (empty: any)."""

    codes: frozenset[str] = field(default_factory=frozenset)
    ids: frozenset[str] = field(default_factory=frozenset)
    keys: frozenset[bytes] = field(default_factory=frozenset)

    @classmethod
    def of(cls, codes: Sequence[str] = (), ids: Sequence[str] = (), keys: Sequence[str] = ()) -> ReplayFilter:
        return cls(frozenset(codes), frozenset(ids), frozenset(k.encode("utf-8") for k in keys))

    @property
    def any(self) -> bool:
        return bool(self.codes or self.ids or self.keys)

    def matches(self, letter: DeadLetter) -> bool:
        if self.codes and letter.code() not in self.codes:
            return False
        if self.ids and letter.request_id() not in self.ids:
            return False
        return not self.keys or letter.key in self.keys
