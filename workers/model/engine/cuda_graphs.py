"""CUDA graphs for the decode step (CUDA only): one graph per lane and bucketed number of slots.

The step's inputs (tokens, positions) and state (self/cross caches) are the lane's persistent
tensors, so a graph captured once replays against whatever they hold. A graphed step computes
every row of its bucket over the whole static cache length (free rows and future positions are
masked or ignored), trading a little arithmetic for one launch instead of hundreds: at small
batches the GPU is otherwise waiting on Python.
"""

from __future__ import annotations

import torch

from workers.model.engine.decoder import FastDecoder


def buckets(slots: int) -> list[int]:
    """Powers of two up to `slots`, and `slots` itself."""
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return [*out, slots]


class GraphedSteps:
    def __init__(self, decoder: FastDecoder, warmups: int = 2):
        if decoder.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.decoder = decoder
        self.warmups = warmups
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, lane, high_water: int) -> int:
        return next(b for b in buckets(lane.slots) if b >= high_water)

    def __call__(self, lane, high_water: int) -> torch.Tensor:
        """Logits for the first `high_water` slots of `lane` (rows beyond them are computed too)."""
        size = self.bucket(lane, high_water)
        key = (id(lane), size)
        if key not in self._graphs:
            self._graphs[key] = self._capture(lane, size)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[: high_water * lane.beams]

    def _capture(self, lane, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        rows = size * lane.beams
        length = lane.caches.self_k.shape[3]

        def step() -> torch.Tensor:
            return self.decoder.step(lane.tokens[:rows], lane.positions[:rows], lane.caches, lane.beams, length)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmups):  # rewrites the same cache entries the real step writes
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self._pool = graph.pool()
        return graph, logits
