"""The batch endpoint's wire format: many prepared images in one HTTP body, answers back as JSON.

What travels is what the replica's model eats: uint8 H×W×3 pixels at the model's input size,
already decoded and resized by the ingest (CPU pods, scaled by KEDA), so the GPU nodes spend
no CPU on JPEG decoding. Measured on this machine (`captioner bench --mode scale` prints it
again, with the sample photos): at 224×224 a frame costs 150,528 B per image and about 0.02 ms
of CPU each way; the original JPEGs average fewer bytes but cost ~4 ms of decode + resize per
image on the receiving side; base64-in-JSON adds a third to the bytes and ~0.5 ms per image.

Request body (content type `application/x-captioner-batch`):

    4 bytes   big-endian length N of the header
    N bytes   UTF-8 JSON: {"params": [GenerationParams, ...], "items": [[h, w, params_index], ...]}
    rest      the images' pixels, item after item, h*w*3 bytes each (C order)

Distinct params are listed once (a micro-batch usually shares one set). The answer is JSON
`{"answers": [ReplicaAnswer as an object, ...]}` in the items' order; a failed generate for a
params group is that answer's `error`, exactly as from a Serve handle. Pure data: no Ray, no
torch, no HTTP library here.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.params import GenerationParams
from workers.replica_api import ReplicaAnswer, ReplicaInfo

CONTENT_TYPE = "application/x-captioner-batch"
BATCH_PATH = "/v1/replica/batch"
INFO_PATH = "/v1/replica/info"
_LENGTH = struct.Struct(">I")

Item = tuple[np.ndarray, GenerationParams]


class FrameError(ValueError):
    """A body that is not a well-formed batch frame (a caller's bug, never transient)."""


def encode_batch(items: Sequence[Item]) -> bytes:
    """Images and their params → one request body."""
    params: dict[GenerationParams, int] = {}
    header_items = []
    chunks: list[bytes] = []
    for pixels, p in items:
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise FrameError(f"pixels must be uint8 H×W×3, got {pixels.dtype} {pixels.shape}")
        index = params.setdefault(p, len(params))
        header_items.append([int(pixels.shape[0]), int(pixels.shape[1]), index])
        chunks.append(np.ascontiguousarray(pixels).tobytes())
    header = json.dumps(
        {"params": [p.model_dump() for p in params], "items": header_items}, separators=(",", ":")
    ).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *chunks])


def decode_batch(body: bytes | memoryview, *, max_items: int | None = None) -> list[Item]:
    """One request body → images (read-only views into `body`, no copy) and their params."""
    view = memoryview(body)
    if len(view) < _LENGTH.size:
        raise FrameError("body shorter than the frame's length prefix")
    (length,) = _LENGTH.unpack_from(view)
    start = _LENGTH.size + length
    if start > len(view):
        raise FrameError(f"header length {length} runs past the body ({len(view)} bytes)")
    try:
        header = json.loads(bytes(view[_LENGTH.size : start]))
        params = [GenerationParams.model_validate(p) for p in header["params"]]
        shapes = [(int(h), int(w), int(i)) for h, w, i in header["items"]]
    except (ValueError, KeyError, TypeError) as e:
        raise FrameError(f"bad frame header: {e}") from None
    if max_items is not None and len(shapes) > max_items:
        raise FrameError(f"{len(shapes)} images in one call; at most {max_items}")
    items: list[Item] = []
    offset = start
    for h, w, i in shapes:
        if h <= 0 or w <= 0 or not 0 <= i < len(params):
            raise FrameError(f"bad item [{h}, {w}, {i}]")
        size = h * w * 3
        if offset + size > len(view):
            raise FrameError("pixels run past the body")
        pixels = np.frombuffer(view, np.uint8, size, offset).reshape(h, w, 3)
        items.append((pixels, params[i]))
        offset += size
    if offset != len(view):
        raise FrameError(f"{len(view) - offset} bytes after the last image")
    return items


def encode_answers(answers: Sequence[ReplicaAnswer]) -> dict[str, Any]:
    return {"answers": [dataclasses.asdict(a) for a in answers]}


def decode_answers(body: dict[str, Any], expected: int) -> list[ReplicaAnswer]:
    answers = [ReplicaAnswer(**a) for a in body["answers"]]
    if len(answers) != expected:
        raise FrameError(f"{len(answers)} answers for {expected} images")
    return answers


def encode_info(info: ReplicaInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def decode_info(body: dict[str, Any]) -> ReplicaInfo:
    return ReplicaInfo(**body)
