"""What the batch endpoint could carry per image, measured: bytes and CPU (encode + decode).

Printed by `captioner bench --mode scale` on the sample photographs; docs/deployment.md ("What
travels") chose the raw uint8 frame from these figures.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import numpy as np

from harness.bench.common import SAMPLES


def wire_costs(rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Bytes and CPU ms per image for what a batch call could carry, on the sample photographs."""
    from PIL import Image

    from workers.images import InputSize, prepare
    from workers.params import GenerationParams
    from workers.replica_wire import decode_batch, encode_batch

    size = InputSize(224, 224, int(Image.Resampling.BILINEAR))
    originals = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    pixels = [prepare(b, size=size, max_pixels=50_000_000).pixels for b in originals]
    params = GenerationParams()
    n = len(pixels) * rounds

    def timed(fn: Any) -> float:
        start = time.process_time()
        for _ in range(rounds):
            fn()
        return (time.process_time() - start) * 1000 / n

    frame = encode_batch([(p, params) for p in pixels])
    out = {
        "raw uint8 frame (chosen)": (
            len(frame) / len(pixels),
            timed(lambda: decode_batch(encode_batch([(p, params) for p in pixels]))),
        ),
        "original JPEG bytes": (
            sum(map(len, originals)) / len(originals),
            timed(lambda: [prepare(b, size=size, max_pixels=50_000_000) for b in originals]),
        ),
    }
    buf = io.BytesIO()
    np.savez(buf, *pixels)

    def npz_round() -> None:
        b = io.BytesIO()
        np.savez(b, *pixels)
        b.seek(0)
        with np.load(b) as z:
            [z[k] for k in z.files]

    out["npz"] = (len(buf.getvalue()) / len(pixels), timed(npz_round))
    b64 = json.dumps([base64.b64encode(p.tobytes()).decode() for p in pixels])
    out["base64 in JSON"] = (
        len(b64) / len(pixels),
        timed(
            lambda: [
                np.frombuffer(base64.b64decode(s), np.uint8)
                for s in json.loads(json.dumps([base64.b64encode(p.tobytes()).decode() for p in pixels]))
            ]
        ),
    )
    return out
