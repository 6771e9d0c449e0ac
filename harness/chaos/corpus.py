"""The request mix of a chaos run: valid images (some repeated, for the cache), awkward-but-valid
and near-limit images that must be captioned, and poison of every kind with the dead-letter code
each must get (hostile records among them: `hostile`).

Deterministic by seed; every request gets a unique id (its Kafka key, or the key's prefix for an
oversized key, and its `id` where the value is a JSON object we control).
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.chaos.hostile import HeaderList, hostile_records, near_limit_images
from harness.chaos.options import BUCKET, PRIVATE_BUCKET, ChaosOptions
from workers.config import LimitsConfig
from workers.outcomes import RESULT


@dataclass(frozen=True)
class Case:
    """One request to produce: its kind, the code it must end with, its value (and key, headers)."""

    kind: str
    expected: str
    value: bytes | None
    id: str = ""
    size: tuple[int, int] | None = None  # (width, height) a result must report, where checked
    headers: HeaderList = ()
    key_pad: int = 0  # bytes appended to the key after the id (an oversized key)
    expect_headers: HeaderList | None = None  # the headers its outcome must carry, where checked

    @property
    def key(self) -> bytes:
        """The Kafka key: the unique id, padded for an oversized-key case."""
        return self.id.encode() + (b"#" + b"k" * self.key_pad if self.key_pad else b"")

    @property
    def null_headers(self) -> bool:
        """Whether a header value is null (kafka-python refuses to write those; librdkafka does)."""
        return any(v is None for _, v in self.headers)


def _png(width: int, height: int, rng: random.Random) -> bytes:
    from PIL import Image

    noise = bytes(rng.getrandbits(8) for _ in range(width * height * 3))
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), noise).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(width: int, height: int, mode: str = "RGB", **save: Any) -> bytes:
    from PIL import Image

    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A ~100-byte PNG whose header declares width×height pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG with its frame header (SOF0) patched to declare width×height."""
    data = bytearray(_jpeg(16, 16))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def awkward_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Valid images that must be captioned, with the (width, height) the result must report."""
    import numpy as np
    from PIL import Image

    cmyk = _jpeg(40, 30, mode="CMYK")
    buf = io.BytesIO()
    Image.fromarray(np.arange(36 * 28, dtype=np.uint16).reshape(28, 36) * 60).save(buf, "PNG")  # mode I;16
    sixteen_bit = buf.getvalue()
    frames = [Image.new("P", (30, 20), color=i * 40) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gif = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = _jpeg(48, 32, exif=exif.tobytes())
    return {
        "awkward_cmyk": (cmyk, (40, 30)),
        "awkward_16bit": (sixteen_bit, (36, 28)),
        "awkward_animated_gif": (gif, (30, 20)),
        "awkward_exif_rotated": (rotated, (32, 48)),  # stored 48×32, shown upright 32×48
    }


@dataclass
class Corpus:
    """Objects to upload (key → bytes) and the cases that reference them, in produce order."""

    objects: dict[tuple[str, str], bytes]
    cases: list[Case]


def build_corpus(opts: ChaosOptions, limits: LimitsConfig, run_id: str) -> Corpus:
    rng = random.Random(opts.seed)
    objects: dict[tuple[str, str], bytes] = {}
    near_rng = random.Random(opts.seed + 1)  # its own draws: the rest of the mix stays as it was

    def put(key: str, data: bytes, bucket: str = BUCKET) -> str:
        objects[(bucket, key)] = data
        return f"s3://{bucket}/{key}"

    def req(image: str, **extra: Any) -> bytes:
        return json.dumps({"image": image, **extra}).encode()

    too_big_object = put("chaos/too-big.bin", bytes(limits.max_object_bytes + 1024))
    truncated = _jpeg(64, 48)
    poison: list[tuple[str, str, Callable[[], bytes | None]]] = [
        ("invalid_json", "invalid_message", lambda: b'{"image": "s3://images/a.png", '),
        ("wrong_shape_list", "invalid_message", lambda: b"[1, 2, 3]"),
        ("wrong_shape_image_type", "invalid_message", lambda: req_raw({"image": ["s3://images/a.png"]})),
        ("unknown_field", "invalid_message", lambda: req_raw({"image": "s3://images/a.png", "url": "x"})),
        ("empty_value", "invalid_message", lambda: b""),
        ("tombstone", "invalid_message", lambda: None),
        ("not_utf8", "invalid_message", lambda: b"\xff\xfe\x00garbage"),
        (
            "huge_value",
            "invalid_message",
            lambda: req(f"s3://{BUCKET}/a.png", metadata={"pad": "x" * (limits.max_message_bytes + 4096)}),
        ),
        ("missing_image", "invalid_message", lambda: req_raw({"metadata": {"a": 1}})),
        ("http_reference", "forbidden_reference", lambda: req("http://example.com/cat.jpg")),
        ("file_reference", "forbidden_reference", lambda: req("file:///etc/passwd")),
        (
            "metadata_service",
            "forbidden_reference",
            lambda: req("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        ),
        ("bucket_not_allowed", "forbidden_reference", lambda: req(f"s3://{PRIVATE_BUCKET}/secret.png")),
        ("key_escape", "forbidden_reference", lambda: req(f"s3://{BUCKET}/chaos/../../etc/passwd")),
        ("missing_key", "object_not_found", lambda: req(f"s3://{BUCKET}/chaos/missing-{rng.randrange(10**9)}.png")),
        ("object_too_large", "object_too_large", lambda: req(too_big_object)),
        ("truncated_jpeg", "invalid_image", lambda: req(put("chaos/truncated.jpg", truncated[: len(truncated) // 2]))),
        ("random_bytes", "invalid_image", lambda: req(put("chaos/random.bin", b"\0\1" + rng.randbytes(2000)))),
        ("text_file", "invalid_image", lambda: req(put("chaos/readme.txt", b"this is not an image\n" * 40))),
        ("decompression_bomb", "image_too_large", lambda: req(put("chaos/bomb.png", bomb_png()))),
        ("100_megapixels", "image_too_large", lambda: req(put("chaos/100mp.jpg", jpeg_declaring(10_000, 10_000)))),
    ]
    put("secret.png", _png(8, 8, rng), bucket=PRIVATE_BUCKET)
    awkward = awkward_images() | near_limit_images(limits, near_rng)
    awkward_uris = {kind: put(f"chaos/{kind}.img", data) for kind, (data, _) in awkward.items()}

    hostile = hostile_records(limits, f"s3://{BUCKET}/chaos/valid/0.png")
    n_poison = max(len(poison) + len(hostile), int(opts.requests * opts.poison_fraction))
    n_awkward = max(len(awkward), opts.requests // 50)
    n_valid = max(1, opts.requests - n_poison - n_awkward)
    # Many distinct images, a third of the valid requests repeating one (the cache answers those).
    n_distinct = max(1, min(n_valid - n_valid // 3, 4000))
    valid_uris = [
        put(f"chaos/valid/{i}.png", _png(rng.randrange(24, 72), rng.randrange(24, 72), rng)) for i in range(n_distinct)
    ]

    cases: list[Case] = []
    for i in range(n_valid):
        uri = valid_uris[i] if i < n_distinct else rng.choice(valid_uris)
        cases.append(Case("valid" if i < n_distinct else "valid_repeat", RESULT, req(uri)))
    awkward_kinds = list(awkward)
    for i in range(n_awkward):
        kind = awkward_kinds[i % len(awkward_kinds)]
        cases.append(Case(kind, RESULT, req(awkward_uris[kind]), size=awkward[kind][1]))
    n_hostile = max(len(hostile), n_poison * len(hostile) // (len(poison) + len(hostile)))
    for i in range(n_poison - n_hostile):
        kind, code, make = poison[i % len(poison)]
        cases.append(Case(kind, code, make()))
    for i in range(n_hostile):
        h = hostile[i % len(hostile)]
        cases.append(Case(h.kind, h.expected, h.value, headers=h.headers, key_pad=h.key_pad,
                          expect_headers=h.expect_headers))  # fmt: skip
    rng.shuffle(cases)
    # The unique id goes into the value (where the value is a JSON object we control) and the key.
    out: list[Case] = []
    for n, case in enumerate(cases):
        case_id = f"chaos-{run_id}-{n}"
        value = case.value
        if value is not None and (case.expected == RESULT or case.kind in _ID_IN_BODY):
            body = json.loads(value)  # type: ignore[arg-type]
            value = json.dumps({"id": case_id, **body}).encode()
        out.append(dataclasses.replace(case, value=value, id=case_id))
    return Corpus(objects, out)


# Poison whose JSON body is an object with `image`: the id can ride inside it too.
_ID_IN_BODY = {
    "huge_value",
    "http_reference",
    "file_reference",
    "metadata_service",
    "bucket_not_allowed",
    "key_escape",
    "missing_key",
    "object_too_large",
    "truncated_jpeg",
    "random_bytes",
    "text_file",
    "decompression_bomb",
    "100_megapixels",
    "non_utf8_header_key",
    "oversized_key",
    "oversized_headers",
}


def req_raw(body: Any) -> bytes:
    return json.dumps(body).encode()
