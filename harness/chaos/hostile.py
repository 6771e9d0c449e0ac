"""Hostile records and near-limit images for the chaos mix (issue 10's record classes).

Hostile records are poison the JSON or the Kafka record itself carries: lone surrogates
(`\\ud800` escapes: valid JSON, not text), non-finite numbers (`NaN`, `-Infinity`: Python reads
them, standard JSON has none), a header key that is not UTF-8 (written with kafka-python through
`RawHeaderKey`), a null header value (written with librdkafka; the request is answered and the
header dropped from its result), and a key or headers that take the record over
`limits.max_message_bytes`. Near-limit images are valid and must be captioned: one just under
`limits.max_image_pixels`, one just under `limits.max_object_bytes`.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

from workers.config import LimitsConfig
from workers.kafkaclient import RawHeaderKey
from workers.outcomes import RESULT

HeaderList = tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True)
class HostileRecord:
    """A hostile record's value (with `{uri}` to fill), headers, key padding and expected code."""

    kind: str
    expected: str
    value: bytes
    headers: HeaderList = ()
    key_pad: int = 0  # bytes appended to the key (the request id stays its prefix)
    expect_headers: HeaderList | None = None  # the headers its outcome must carry, where checked


def hostile_records(limits: LimitsConfig, uri: str) -> list[HostileRecord]:
    """Each hostile kind, referencing the valid image `uri` (so only the hostile part is wrong)."""
    ref = uri.encode()
    over = limits.max_message_bytes + 1024
    return [
        HostileRecord("surrogate_in_id", "invalid_message", b'{"id": "\\ud800", "image": "%s"}' % ref),
        HostileRecord("surrogate_in_metadata", "invalid_message",
                      b'{"image": "%s", "metadata": {"note": "a\\udfffb"}}' % ref),
        HostileRecord("nan_in_params", "invalid_message", b'{"image": "%s", "params": {"temperature": NaN}}' % ref),
        HostileRecord("infinity_in_metadata", "invalid_message",
                      b'{"image": "%s", "metadata": {"n": -Infinity}}' % ref),
        HostileRecord("non_utf8_header_key", "invalid_message", b'{"image": "%s"}' % ref,
                      headers=((RawHeaderKey("trace\udcff"), b"x"), ("ok", b"1"))),
        HostileRecord("null_header_value", RESULT, b'{"image": "%s"}' % ref,
                      headers=(("null", None), ("kept", b"yes")), expect_headers=(("kept", b"yes"),)),
        HostileRecord("oversized_key", "invalid_message", b'{"image": "%s"}' % ref, key_pad=over),
        HostileRecord("oversized_headers", "invalid_message", b'{"image": "%s"}' % ref,
                      headers=(("pad", b"h" * over),)),
    ]  # fmt: skip


def near_limit_images(limits: LimitsConfig, rng: random.Random) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid images at the edge of the limits, with the (width, height) a result must report."""
    from PIL import Image

    side = int(limits.max_image_pixels**0.5) - 8  # just under the pixel cap
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buf, "JPEG", quality=80)
    pixels = buf.getvalue()
    # Noise does not compress: an RGB PNG of n² pixels is ~3n² bytes plus a little framing.
    n = int((limits.max_object_bytes * 0.9 / 3) ** 0.5)
    noise = rng.randbytes(n * n * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (n, n), noise).save(buf, "PNG")
    heavy = buf.getvalue()
    assert len(heavy) <= limits.max_object_bytes, "near-limit PNG over max_object_bytes"
    return {"near_limit_pixels": (pixels, (side, side)), "near_limit_bytes": (heavy, (n, n))}


def headers_list(headers: HeaderList) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in headers]
