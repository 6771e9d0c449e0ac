"""What travels between a caller (the worker, the HTTP ingress) and a model replica.

Plain, cheap-to-serialise data: no Ray, no torch. A replica answers each image with a
`ReplicaAnswer`; a failed `generate` for an image's params group travels in-band as the answer's
`error` (the images batched beside it are not failed with it). `ReplicaInfo` is what a caller
needs to prepare images for the replica's model and to label results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.images import InputSize


@dataclass(frozen=True)
class ReplicaAnswer:
    """One image's captions, with the batch it rode in and how long generation took."""

    captions: list[str]
    scores: list[float] | None
    batch_size: int
    inference_ms: float
    error: str | None = None  # why this image's group failed; raised to its caller alone


class InferenceError(RuntimeError):
    """generate failed for this request's params group."""


class ReplicasUnavailable(ConnectionError):
    """The inference tier could not be reached or would not take the call right now: connection
    refused or reset, Serve's 503 backpressure, a timeout, a replica restarting in an upgrade.
    Transient by definition: the caller pauses and retries with backoff; never a dead letter."""


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica's model identity, input spec and placement."""

    model: dict[str, Any]  # the results' `model` field: name, backend, untrained
    height: int
    width: int
    resample: int
    device: str
    gpu_ids: list[str] = field(default_factory=list)
    cuda_visible_devices: str | None = None
    replica_id: str = ""
    pid: int = 0

    @property
    def input_size(self) -> InputSize:
        return InputSize(self.height, self.width, self.resample)
