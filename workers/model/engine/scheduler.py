"""Continuous batching: many images in flight, each slot refilled as soon as its image finishes.

Images wait in a queue per beam count ("lane": slots × beams rows sharing one static KV cache).
Each `step()` first admits queued images into free slots (one encoder pass for all of them,
cross-attention K/V written into their slots; images the encoder stage prepared bring their K/V
and are only copied in) and then runs one decode step for every lane that
has images in flight. An image leaves the moment its search is done, by `generate`'s own stopping
rule, and its future is resolved; the others go on. Rows of free slots are computed but ignored.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from workers.model.engine.decoder import Caches, FastDecoder
from workers.model.engine.search import BeamSearch, DecodeSpec, Finished, GreedySearch


@dataclass
class Request:
    pixels: torch.Tensor  # 3×H×W, normalised
    spec: DecodeSpec
    future: Future = field(default_factory=Future)
    # Cross-attention K and V (layers × H × S × D each) when the encoder stage prepared the image.
    cross: tuple[torch.Tensor, torch.Tensor] | None = None


class Lane:
    """All in-flight images with the same beam count."""

    def __init__(
        self, decoder: FastDecoder, beams: int, slots: int, length: int, encoder_length: int, tokens: dict[str, int]
    ):
        device = decoder.device
        self.beams, self.slots, self.start = beams, slots, tokens["start"]
        self.caches: Caches = decoder.allocate(slots * beams, slots, length, encoder_length)
        if beams == 1:
            self.search: GreedySearch | BeamSearch = GreedySearch(slots, length, tokens["eos"], tokens["pad"], device)
        else:
            self.search = BeamSearch(slots, beams, length, tokens["eos"], tokens["pad"], device)
        self.tokens = torch.full((slots * beams,), self.start, dtype=torch.int64, device=device)
        self.positions = torch.zeros(slots * beams, dtype=torch.int64, device=device)
        self.occupied = torch.zeros(slots * beams, dtype=torch.bool, device=device)
        self.occupants: list[Request | None] = [None] * slots
        self.queue: deque[Request] = deque()
        self.moves = 0  # images moved down by `compact`

    def in_flight(self) -> int:
        return sum(r is not None for r in self.occupants)

    def high_water(self) -> int:
        return max((s + 1 for s, r in enumerate(self.occupants) if r is not None), default=0)

    def seat(self, slot: int, request: Request) -> None:
        rows = slice(slot * self.beams, (slot + 1) * self.beams)
        self.occupants[slot] = request
        self.search.reset(slot, request.spec, self.start)
        self.tokens[rows] = self.start
        self.positions[rows] = 0
        self.occupied[rows] = True

    def vacate(self, slot: int) -> Request:
        request = self.occupants[slot]
        assert request is not None
        self.occupants[slot] = None
        rows = slice(slot * self.beams, (slot + 1) * self.beams)
        self.occupied[rows] = False
        self.positions[rows] = 0  # an empty row must stay inside the cache
        return request

    def compact(self) -> None:
        """Move the highest images into lower free slots, so the occupied slots are a prefix and a
        step computes no rows for holes (a step covers slots up to the highest occupied one)."""
        while True:
            free = next((s for s, r in enumerate(self.occupants) if r is None), None)
            high = max((s for s, r in enumerate(self.occupants) if r is not None), default=None)
            if free is None or high is None or free > high:
                return
            self._move(high, free)

    def _move(self, src: int, dst: int) -> None:
        k = self.beams
        from_rows, to_rows = slice(src * k, (src + 1) * k), slice(dst * k, (dst + 1) * k)
        caches = self.caches
        for per_row in (caches.self_k, caches.self_v):
            per_row[:, to_rows] = per_row[:, from_rows]
        for per_slot in (caches.cross_k, caches.cross_v):
            per_slot[:, dst] = per_slot[:, src]
        for row_state in (self.tokens, self.positions, self.occupied):
            row_state[to_rows] = row_state[from_rows]
        self.search.move(src, dst)
        self.moves += 1
        self.occupants[dst], self.occupants[src] = self.occupants[src], None
        self.occupied[from_rows] = False
        self.positions[from_rows] = 0


class Scheduler:
    """Owns the lanes; `submit` is thread-safe, `step` runs on one thread at a time."""

    def __init__(
        self,
        decoder: FastDecoder,
        *,
        tokens: dict[str, int],
        image_size: int,
        max_images: int,
        max_new_tokens: int,
        graphs: Callable[[Lane, int], torch.Tensor] | None = None,
    ):
        self.decoder = decoder
        self.graphs = graphs  # CUDA graphs of the step (cuda_graphs.GraphedSteps), or None
        self.tokens = tokens
        self.max_images = max_images
        self.length = 1 + max_new_tokens  # static cache length: start token + the longest caption
        self.encoder_length = decoder.encoder_length(image_size)
        self.lanes: dict[int, Lane] = {}
        self._lock = threading.Lock()
        self.steps = 0
        self.joined_mid_flight = 0  # images admitted while others were decoding

    def submit(self, request: Request) -> Future:
        with self._lock:
            lane = self.lanes.get(request.spec.beams)
            if lane is None:
                lane = Lane(
                    self.decoder, request.spec.beams, self.max_images, self.length, self.encoder_length, self.tokens
                )
                self.lanes[request.spec.beams] = lane
            lane.queue.append(request)
        return request.future

    def pending(self) -> int:
        with self._lock:
            return sum(len(lane.queue) + lane.in_flight() for lane in self.lanes.values())

    def in_flight(self) -> int:
        """Images decoding now (not those queued)."""
        return sum(lane.in_flight() for lane in list(self.lanes.values()))

    def step(self) -> int:
        """Admit queued images, then one decode step per busy lane; returns images finished."""
        finished = 0
        for lane in list(self.lanes.values()):
            self._admit(lane)
            if lane.in_flight():
                finished += self._decode(lane)
        self.steps += 1
        return finished

    def run_until_idle(self) -> None:
        while self.pending():
            self.step()

    def fail_in_flight(self, error: Exception) -> None:
        """After a failed step: fail the images in flight (their caches are suspect); queued ones stay."""
        for lane in self.lanes.values():
            for slot, request in enumerate(lane.occupants):
                if request is not None:
                    lane.vacate(slot).future.set_exception(error)

    def _admit(self, lane: Lane) -> None:
        with self._lock:
            free = [s for s, r in enumerate(lane.occupants) if r is None]
            admitted = [(free[i], lane.queue.popleft()) for i in range(min(len(free), len(lane.queue)))]
        if not admitted:
            return
        raw = [(slot, request) for slot, request in admitted if request.cross is None]
        for slot, request in admitted:
            if request.cross is not None:  # prepared by the encoder stage: only its K/V to copy
                lane.caches.cross_k[:, slot] = request.cross[0]
                lane.caches.cross_v[:, slot] = request.cross[1]
                request.cross = None
        if raw:
            try:
                pixels = torch.stack([r.pixels for _, r in raw]).to(self.decoder.device)
                slots = torch.tensor([s for s, _ in raw], device=self.decoder.device)
                self.decoder.fill_cross(lane.caches, slots, self.decoder.encode(pixels))
            except Exception as e:  # noqa: BLE001 - a bad image batch fails its requests, not the loop
                for _, request in raw:
                    request.future.set_exception(e)
                admitted = [(slot, request) for slot, request in admitted if not request.future.done()]
        if lane.in_flight():
            self.joined_mid_flight += len(admitted)
        for slot, request in admitted:
            lane.seat(slot, request)

    def _decode(self, lane: Lane) -> int:
        k = lane.beams
        rows = lane.high_water() * k
        positions = lane.positions[:rows]
        if self.graphs is not None:  # static shapes: the whole cache length, no host sync
            kv_length = self.length
            logits = self.graphs(lane, rows // k)
        else:  # only the positions in use: less to read on CPU
            kv_length = int(positions.max()) + 1
            logits = self.decoder.step(lane.tokens[:rows], positions, lane.caches, k, kv_length)
        tokens, source_rows, done = lane.search.advance(logits)
        if source_rows is not None:
            lane.caches.reorder_rows(source_rows, kv_length)
        lane.tokens[:rows] = tokens
        lane.positions[:rows] = torch.where(lane.occupied[:rows], positions + 1, 0)
        results: list[tuple[int, Finished]] = [
            (slot, lane.search.result(slot))
            for slot in done.nonzero().squeeze(1).tolist()
            if lane.occupants[slot] is not None
        ]
        for slot, result in results:
            lane.vacate(slot).future.set_result(result)
        if results:
            lane.compact()
        return len(results)
