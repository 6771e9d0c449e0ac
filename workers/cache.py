"""An LRU of captions keyed by the image's digest and the effective params.

Identical bytes with identical params give identical tokens (the model core is batch-invariant
and deterministic without sampling), so a hit skips decode and inference. Sampled requests with
no seed are never cached: the caller asked for randomness.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from workers.params import GenerationParams


@dataclass(frozen=True)
class CachedCaption:
    captions: list[str]
    scores: list[float] | None
    width: int
    height: int


CacheKey = tuple[str, GenerationParams]


class CaptionCache:
    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[CacheKey, CachedCaption] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: bytes, params: GenerationParams) -> CacheKey | None:
        if params.do_sample and params.seed is None:
            return None
        return hashlib.sha256(data).hexdigest(), params

    def get(self, key: CacheKey | None) -> CachedCaption | None:
        if key is None or self.size == 0:
            return None
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
            return hit

    def put(self, key: CacheKey | None, value: CachedCaption) -> None:
        if key is None or self.size == 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._entries), "size": self.size}
