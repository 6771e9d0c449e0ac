"""`captioner chaos`: a bounded, loopback-only fault-injection run that proves nothing is lost.

One process tree, everything embedded:

- SeaweedFS (S3) and a Tansu broker with DURABLE `s3://` storage on it, so a broker restart keeps
  topics, records and committed offsets;
- Ray (started here, or the one already initialised in this process) and two tiny-random
  replicas deployed under an app name unique to the run (only that app is deleted at the end);
- a ChaosProxy in front of S3 for the workers' fetches (500/503, slow answers, dropped
  connections, cut bodies), deterministic by seed;
- consumer workers as child processes (`python -m workers.chaos consumer-worker`), each running
  a real Pipeline in the same consumer group, so "kill a consumer" is a real SIGKILL: no drain,
  no commit, no LeaveGroup.

A feeder produces the requests (mostly valid images, some repeated for the cache, poison of
every kind, awkward-but-valid images) a bounded distance ahead of the outcomes, so the stream is
still flowing when the faults land: replica kills (`ray.kill` of a Serve replica actor),
consumer kills (SIGKILL + a replacement), broker restarts (`Broker.restart(kill=True)`).

Every request carries a unique id (its Kafka key and its `id`); it is identified by its source
coordinates (topic, partition, offset) from the producer's acknowledgement. After the run every
coordinate must have a result or a dead letter with the expected code; duplicates must stay
within the in-flight window per redelivering fault; no secret may appear in any captured log
line or output record; worker memory must stay bounded. The report says what failed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import logging
import os
import random
import secrets
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from workers.config import (
    KafkaConfig,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    RayConfig,
    ReplicasConfig,
    Settings,
    WorkerConfig,
)
from workers.embedded import Broker, S3Server, wait_until

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BUCKET = "images"
PRIVATE_BUCKET = "chaos-private"  # exists and holds an object, but is not allow-listed
RESULT = "result"  # the expected "code" of a request that must be captioned
END_MARKER_KEY = b"__chaos_end__"
KAFKA_SECRET_ENV = "CAPTIONER_KAFKA__SASL_PASSWORD"


# --- options and report ---------------------------------------------------------------------


@dataclass
class ChaosOptions:
    requests: int = 300
    seed: int = 0
    kill_replicas: int = 1
    kill_consumers: int = 1
    broker_restarts: int = 1
    s3_error_rate: float = 0.05
    s3_drop_rate: float = 0.02
    s3_delay_rate: float = 0.02
    s3_truncate_rate: float = 0.02
    s3_delay_s: float = 0.3
    consumers: int = 2
    partitions: int = 4
    max_in_flight: int = 32
    # A killed replica fails every call it holds; the pipeline retries them through the handle,
    # which may route a retry to the dying replica again before Serve notices. Two tries (the
    # default) are not enough for that: see `Pipeline._infer` and the report.
    inference_attempts: int = 6
    # Tries per object under the proxy's fault rates: with ~10 % of S3 calls failing and two
    # calls per fetch, 8 tries leave ~1e-6 chance per request of a spurious fetch_failed.
    s3_max_attempts: int = 8
    poison_fraction: float = 0.12
    max_worker_rss_mb: int = 1500
    timeout_s: float | None = None  # default: scaled with requests
    workdir: Path | None = None
    keep_workdir: bool = False

    @property
    def deadline_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else 240 + self.requests * 0.15


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ChaosReport:
    command: str
    seed: int
    requests: int
    requests_by_kind: dict[str, int]
    faults: dict[str, Any]
    settings_raised: dict[str, Any]
    results: int
    dead_letters_by_code: dict[str, int]
    outcomes: int
    lost: int
    duplicates: int
    duplicate_bound: int
    unknown_outcomes: int
    wrong_codes: list[str]
    inference_retries: int
    peak_rss_mb: dict[str, float]
    secrets_scanned: dict[str, int]
    secret_leaks: list[str]
    worker_exits: list[str]
    wall_time_s: float
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# --- the request mix --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request to produce: its kind, the code it must end with, its value."""

    kind: str
    expected: str
    value: bytes | None
    id: str = ""
    size: tuple[int, int] | None = None  # (width, height) a result must report, where checked


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
    awkward = awkward_images()
    awkward_uris = {kind: put(f"chaos/{kind}.img", data) for kind, (data, _) in awkward.items()}

    n_poison = max(len(poison), int(opts.requests * opts.poison_fraction))
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
    for i in range(n_poison):
        kind, code, make = poison[i % len(poison)]
        cases.append(Case(kind, code, make()))
    rng.shuffle(cases)
    # The unique id goes into the value (where the value is a JSON object we control) and the key.
    out: list[Case] = []
    for n, case in enumerate(cases):
        case_id = f"chaos-{run_id}-{n}"
        value = case.value
        if value is not None and (case.expected == RESULT or case.kind in _ID_IN_BODY):
            body = json.loads(value)  # type: ignore[arg-type]
            value = json.dumps({"id": case_id, **body}).encode()
        out.append(Case(case.kind, case.expected, value, case_id, case.size))
    return Corpus(objects, out)


# Poison whose JSON body is an object with `image`: the id can ride inside it too.
_ID_IN_BODY = {
    "huge_value", "http_reference", "file_reference", "metadata_service", "bucket_not_allowed", "key_escape",
    "missing_key", "object_too_large", "truncated_jpeg", "random_bytes", "text_file", "decompression_bomb",
    "100_megapixels",
}


def req_raw(body: Any) -> bytes:
    return json.dumps(body).encode()


# --- settings ---------------------------------------------------------------------------------


def chaos_settings(
    opts: ChaosOptions, *, bootstrap: str, s3_endpoint: str, run_id: str, kafka_secret: str
) -> Settings:
    return Settings(
        model=ModelConfig(source="tiny-random", cache_dir=REPO / ".tmp" / "models", torch_threads=1),
        kafka=KafkaConfig(
            bootstrap_servers=bootstrap,
            input_topic=f"chaos-in-{run_id}",
            output_topic=f"chaos-out-{run_id}",
            dead_letter_topic=f"chaos-dlq-{run_id}",
            group_id=f"chaos-group-{run_id}",
            client_id=f"chaos-{run_id}",
            consumers=1,
            # Short sessions (FIELD-NOTES: the first join waits half of it; a SIGKILLed member's
            # partitions move after it), frequent commits (fewer redeliveries per fault).
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            poll_timeout_ms=100,
            commit_interval_s=0.2,
            # Not used on PLAINTEXT: present so the scan proves a configured secret never leaks.
            sasl_password=SecretStr(kafka_secret),
        ),
        s3={
            "endpoint_url": s3_endpoint,
            "allowed_buckets": [BUCKET],
            "max_attempts": opts.s3_max_attempts,
            "backoff_s": 0.02,
            "read_timeout_s": 10,
        },
        worker=WorkerConfig(
            max_in_flight=opts.max_in_flight,
            fetch_concurrency=8,
            drain_timeout_s=60,
            revoke_grace_s=5,
            inference_attempts=opts.inference_attempts,
        ),
        replicas=ReplicasConfig(num_replicas=2, num_cpus=0, max_batch_size=8, batch_wait_timeout_s=0.02),
        limits=LimitsConfig(max_message_bytes=256 * 1024, max_object_bytes=1024 * 1024),
        metrics=MetricsConfig(port=0),
    )


# --- Ray and the replicas -------------------------------------------------------------------


@contextlib.contextmanager
def replicas_app(settings: Settings, app_name: str, ray_tmp: Path) -> Iterator[Any]:
    """Reuse an initialised Ray (tests) or start one; deploy our app; delete only what we made."""
    from workers.runner import start_ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from workers.replicas import replica_app

    started_ray = not ray.is_initialized()
    if started_ray:
        ray_tmp.mkdir(parents=True, exist_ok=True)
        start_ray(RayConfig(num_cpus=2, temp_dir=ray_tmp, namespace="captioner-chaos"))
    serve.start(proxy_location="Disabled")
    try:
        yield serve.run(replica_app(settings.model, None, settings.replicas), name=app_name, route_prefix=None)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(app_name)
        if started_ray:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def replica_actor_names(app_name: str) -> list[str]:
    """Names of the app's live replica actors (Serve names them SERVE_REPLICA::app#deployment#id)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_one_replica(app_name: str, rng: random.Random) -> str:
    """ray.kill one live replica of the app: the calls it holds fail mid-batch."""
    import ray

    names = replica_actor_names(app_name)
    victim = rng.choice(names)
    # Not waiting for the replacement: the stream keeps flowing through the other replica
    # while Serve starts a new one (checked at the end of the run).
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    return victim


def restart_broker(broker: Broker) -> None:
    """kill -9 and start again on the same port (durable storage keeps everything)."""
    broker.restart(kill=True)


# --- consumer workers (child processes) -----------------------------------------------------


class ConsumerWorker:
    """A child process running one Pipeline; SIGKILL is a real crash."""

    def __init__(self, index: int, workdir: Path, settings_path: Path, app_name: str, env: dict[str, str]):
        self.index = index
        self.name = f"consumer-{index}"
        self.log_path = workdir / f"{self.name}.log"
        self.ready_path = workdir / f"{self.name}.ready"
        self.stats_path = workdir / f"{self.name}.stats.json"
        import ray

        self.argv = [
            sys.executable, "-m", "workers.chaos", "consumer-worker",
            "--settings", str(settings_path), "--app", app_name, "--name", self.name,
            "--ray-address", ray.get_runtime_context().gcs_address,
            "--ready", str(self.ready_path), "--stats", str(self.stats_path),
        ]  # fmt: skip
        self.env = env
        self.killed = False
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ConsumerWorker:
        with open(self.log_path, "ab") as out:
            self._popen = subprocess.Popen(
                self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=REPO,
            )  # fmt: skip
        _children.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def wait_ready(self, timeout_s: float = 120) -> None:
        def exited() -> str | None:
            code = self.exit_code()
            return None if code is None else f"{self.name} exited with {code}: {_tail(self.log_path)}"

        wait_until(self.ready_path.exists, timeout_s=timeout_s, interval_s=0.1, what=f"{self.name} ready", abort=exited)

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self.killed = True
            os.kill(self._popen.pid, signal.SIGKILL)
            self._popen.wait(30)

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM: the worker drains, commits and exits; SIGKILL past the timeout."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            os.kill(self._popen.pid, signal.SIGTERM)
            try:
                self._popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing", self.name, timeout_s)
                self.kill()
        _children.discard(self)
        return self._popen.returncode

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}


_children: set[ConsumerWorker] = set()


@atexit.register
def _kill_children() -> None:
    for child in list(_children):
        with contextlib.suppress(Exception):
            child.kill()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def consumer_worker_main(argv: list[str]) -> int:
    """The child: connect to the run's Ray, get the replica app's handle, run a Pipeline until SIGTERM."""
    parser = argparse.ArgumentParser(prog="workers.chaos consumer-worker")
    for flag in ("--settings", "--app", "--name", "--ray-address", "--ready", "--stats"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    _configure_logging(logging.StreamHandler(sys.stderr))
    data = json.loads(Path(args.settings).read_text())
    settings = Settings(**data)  # the SASL password comes from the environment, as in production
    import ray
    from ray import serve

    from workers import metrics
    from workers.pipeline import Pipeline

    ray.init(address=args.ray_address, namespace="captioner-chaos", log_to_driver=False)
    pipeline = Pipeline(settings, serve.get_app_handle(args.app), name=args.name)
    signal.signal(signal.SIGTERM, lambda *_: pipeline.request_stop())
    signal.signal(signal.SIGINT, lambda *_: pipeline.request_stop())
    pipeline.start()
    pipeline.wait_started()
    Path(args.ready).write_text(str(os.getpid()))
    log.info("%s: running (pid %d)", args.name, os.getpid())
    pipeline.wait()
    pipeline.stop()
    stats = {
        "window_peak": pipeline.window.peak,
        "failed": pipeline.failed.is_set(),
        "inference_retries": metrics.INFERENCE_RETRIES._value.get(),
        "vm_hwm_kb": _proc_status_kb(os.getpid(), "VmHWM"),
    }
    Path(args.stats).write_text(json.dumps(stats))
    return 1 if pipeline.failed.is_set() else 0


# --- the feeder and the collector -------------------------------------------------------------


class Feeder(threading.Thread):
    """Produces the cases, at most `lead` ahead of the outcomes seen; records each one's coordinates."""

    def __init__(self, settings: Settings, cases: list[Case], progress: Callable[[], int], lead: int):
        super().__init__(name="chaos-feeder", daemon=True)
        self.settings = settings
        self.cases = cases
        self.progress = progress
        self.lead = lead
        self.coordinates: dict[tuple[str, int, int], int] = {}  # → index into cases
        # Acknowledged with offset -1 (Tansu does that now and then; some were written, some
        # never appeared): sent again; until a real offset comes back, matched by the unique id.
        self.unplaced: dict[str, int] = {}
        self.acks_without_offset = 0
        self.resends = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        from kafka import KafkaProducer

        from workers.kafkaclient import producer_kwargs

        kafka = self.settings.kafka
        producer = KafkaProducer(**producer_kwargs(kafka, self.settings.limits))
        try:
            chunk = 25
            for start in range(0, len(self.cases), chunk):
                wait_until(
                    lambda: self._halt.is_set() or len(self.coordinates) - self.progress() < self.lead,
                    timeout_s=600, interval_s=0.05, what="outcomes to catch up with the feeder",
                )  # fmt: skip
                if self._halt.is_set():
                    return
                self._send(producer, list(range(start, min(start + chunk, len(self.cases)))))
        except BaseException as e:
            self.error = e
            log.exception("feeder failed")
        finally:
            producer.close(timeout=10)
            self.done.set()

    def _send(self, producer: Any, indices: list[int], attempts: int = 5) -> None:
        topic = self.settings.kafka.input_topic
        for attempt in range(1, attempts + 1):
            futures = [
                (i, producer.send(topic, value=self.cases[i].value, key=self.cases[i].id.encode())) for i in indices
            ]
            producer.flush(timeout=120)
            failed = []
            for i, future in futures:
                try:
                    meta = future.get(timeout=0)
                    if meta.offset < 0:
                        # Not a confirmed write (some such records never showed up): send again.
                        # If the first copy was written after all, its outcome is matched by id.
                        log.warning("feeder: %s acknowledged without an offset (%d)", self.cases[i].id, meta.offset)
                        self.unplaced[self.cases[i].id] = i
                        self.acks_without_offset += 1
                        failed.append(i)
                    else:
                        self.coordinates[(meta.topic, meta.partition, meta.offset)] = i
                        self.unplaced.pop(self.cases[i].id, None)
                except Exception as e:
                    log.warning("feeder: send of %s failed (%s); resending", self.cases[i].id, type(e).__name__)
                    failed.append(i)
            if not failed:
                return
            self.resends += len(failed)
            indices = failed
        raise RuntimeError(f"feeder: {len(indices)} request(s) not acknowledged after {attempts} attempts")

    def stop(self) -> None:
        self._halt.set()


@dataclass
class Outcome:
    coordinate: tuple[str, int, int] | None
    key: bytes | None
    code: str
    body: dict[str, Any]


class Collector(threading.Thread):
    """Reads the results and dead-letter topics from the start (no group) up to the end markers,
    scanning each record for secrets.

    Started only after the workers stopped and the markers were produced: a reader that tailed
    the results topic across a broker restart stopped receiving records in a 10,000-request run
    (the records were there: a fresh reader from offset 0 read them all), so the run's progress
    comes from committed offsets (`CommitProgress`) and the outcomes from this fresh read.
    """

    def __init__(self, settings: Settings, secrets_to_find: list[str]):
        super().__init__(name="chaos-collector", daemon=True)
        self.settings = settings
        self.secrets = [s.encode() for s in secrets_to_find]
        self.outcomes: list[Outcome] = []
        self.seen: set[tuple[str, int, int]] = set()
        self.markers: set[str] = set()
        self.records_scanned = 0
        self.rereads = 0  # outcome records read twice (a position reset); counted once
        self._read: set[tuple[str, int]] = set()
        self.leaks: list[str] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from workers.kafkaclient import client_kwargs

        kafka = self.settings.kafka
        # earliest, not kafka-python's default latest: should the broker answer "offset out of
        # range" after a restart (FIELD-NOTES: its end offsets are wrong), a reset to the end
        # would skip outcomes; a reset to the start only re-reads them, and `_take` drops those.
        consumer = KafkaConsumer(
            enable_auto_commit=False, group_id=None, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024, **client_kwargs(kafka),
        )  # fmt: skip
        try:
            # Both topics have one partition (created so): the end marker orders after everything.
            consumer.assign([TopicPartition(kafka.output_topic, 0), TopicPartition(kafka.dead_letter_topic, 0)])
            consumer.seek_to_beginning()
            while not self._halt.is_set() and len(self.markers) < 2:
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        self._take(record)
        except BaseException as e:
            self.error = e
            log.exception("collector failed")
        finally:
            consumer.close()

    def _take(self, record: Any) -> None:
        if (record.topic, record.offset) in self._read:
            self.rereads += 1
            return
        self._read.add((record.topic, record.offset))
        if record.key == END_MARKER_KEY:
            with self._lock:
                self.markers.add(record.topic)
            return
        blobs = [record.value or b"", record.key or b""] + [v for _, v in record.headers or []]
        for secret in self.secrets:
            if any(secret in blob for blob in blobs):
                self.leaks.append(f"{record.topic}@{record.offset}")
        body = json.loads(record.value)
        source = body.get("source")
        coordinate = (source["topic"], source["partition"], source["offset"]) if source else None
        code = body["error"]["code"] if "error" in body else RESULT
        with self._lock:
            self.records_scanned += 1
            self.outcomes.append(Outcome(coordinate, record.key, code, body))
            if coordinate is not None:
                self.seen.add(coordinate)

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


class CommitProgress:
    """Requests finished so far per input partition: the group's committed offsets.

    A commit means every earlier offset of the partition has an acknowledged outcome, and the
    broker keeps commits right across restarts (FIELD-NOTES; its end offsets it does not).
    Thread-safe (the feeder and the main thread both ask); asks the broker at most twice a second.
    """

    def __init__(self, settings: Settings, partitions: int):
        from kafka import KafkaConsumer, TopicPartition

        from workers.kafkaclient import client_kwargs

        kafka = settings.kafka
        self._consumer = KafkaConsumer(group_id=kafka.group_id, enable_auto_commit=False, **client_kwargs(kafka))
        self._tps = [TopicPartition(kafka.input_topic, p) for p in range(partitions)]
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._asked = 0.0

    def committed(self) -> dict[int, int]:
        from kafka.errors import KafkaError

        with self._lock:
            if time.monotonic() - self._asked >= 0.5:
                try:
                    self._last = {tp.partition: self._consumer.committed(tp, timeout_ms=5000) or 0 for tp in self._tps}
                except KafkaError as e:  # the broker is restarting: keep the last answer
                    log.debug("committed offsets unavailable: %s", type(e).__name__)
                self._asked = time.monotonic()
            return dict(self._last)

    def done(self) -> int:
        return sum(self.committed().values())

    def covers(self, produced: dict[tuple[str, int, int], int]) -> bool:
        """Whether every produced offset is below its partition's commit."""
        committed = self.committed()
        ends: dict[int, int] = {}
        for _topic, partition, offset in list(produced):
            ends[partition] = max(ends.get(partition, -1), offset)
        return all(committed.get(p, 0) > end for p, end in ends.items())

    def close(self) -> None:
        with self._lock:
            self._consumer.close()


def produce_end_markers(settings: Settings) -> None:
    """One marker per outcome topic, produced after every worker stopped: reading up to it reads all."""
    from kafka import KafkaProducer

    from workers.kafkaclient import producer_kwargs

    producer = KafkaProducer(**producer_kwargs(settings.kafka, settings.limits))
    try:
        for topic in (settings.kafka.output_topic, settings.kafka.dead_letter_topic):
            producer.send(topic, key=END_MARKER_KEY, value=b"{}", partition=0).get(timeout=60)
    finally:
        producer.close(timeout=10)


# --- memory and logs --------------------------------------------------------------------------


def _proc_status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _category(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if "consumer-worker" in cmd:
        return "consumer_workers"
    if "ServeReplica" in cmd:
        return "replicas"
    if "tansu" in cmd or "weed" in cmd:
        return "servers"
    return "ray_other"


class MemorySampler(threading.Thread):
    """Samples the RSS of this process tree (Ray workers, children, servers) once a second."""

    def __init__(self, interval_s: float = 1.0):
        super().__init__(name="chaos-memory", daemon=True)
        self.interval_s = interval_s
        self.root = os.getpid()
        self.peak_tree_kb = 0
        self.peak_by_category_kb: Counter[str] = Counter()  # largest sum per category at one sample
        self.peak_process_kb: Counter[str] = Counter()  # largest single process per category (VmHWM)
        self._halt = threading.Event()

    def sample(self) -> None:
        sums: Counter[str] = Counter()
        for pid in _descendants(self.root):
            category = _category(pid, self.root)
            sums[category] += _proc_status_kb(pid, "VmRSS")
            hwm = _proc_status_kb(pid, "VmHWM")
            self.peak_process_kb[category] = max(self.peak_process_kb[category], hwm)
        self.peak_tree_kb = max(self.peak_tree_kb, sum(sums.values()))
        for category, kb in sums.items():
            self.peak_by_category_kb[category] = max(self.peak_by_category_kb[category], kb)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.sample()

    def report_mb(self) -> dict[str, float]:
        out = {"tree_total": round(self.peak_tree_kb / 1024, 1)}
        out.update({f"{k}_total": round(v / 1024, 1) for k, v in sorted(self.peak_by_category_kb.items())})
        out.update({f"{k}_largest_process": round(v / 1024, 1) for k, v in sorted(self.peak_process_kb.items())})
        return out


_LOG_FORMAT = "%(asctime)s %(processName)s %(threadName)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(handler: logging.Handler) -> Callable[[], None]:
    """Send everything (our modules at DEBUG, the rest at INFO) to `handler`; returns an undo."""
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    root, ours = logging.getLogger(), logging.getLogger("workers")
    saved = (root.level, ours.level)
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    ours.setLevel(logging.DEBUG)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        handler.close()

    return undo


def scan_files(paths: list[Path], secrets_to_find: list[str]) -> tuple[int, int, list[str]]:
    """(files, lines scanned, 'file:line' of every line holding a secret)."""
    needles = [s.encode() for s in secrets_to_find]
    files = lines = 0
    leaks: list[str] = []
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError:
            continue
        files += 1
        with handle:
            for number, line in enumerate(handle, 1):
                lines += 1
                if any(n in line for n in needles):
                    leaks.append(f"{path.name}:{number}")
    return files, lines, leaks


def _ray_log_files(since: float) -> list[Path]:
    """This Ray session's log files written during the run (replica stdout/stderr among them)."""
    try:
        import ray

        logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API for it
    except Exception:
        return []
    return [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= since]


# --- the run ------------------------------------------------------------------------------------


@dataclass
class _Fault:
    at: float  # fraction of requests with an outcome
    kind: str


def fault_schedule(opts: ChaosOptions) -> list[_Fault]:
    """Faults round-robin by kind, spread over 15–80 % of the stream (so each lands mid-stream)."""
    queues = [
        ["replica_kill"] * opts.kill_replicas,
        ["consumer_kill"] * opts.kill_consumers,
        ["broker_restart"] * opts.broker_restarts,
    ]
    kinds = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return [_Fault(0.15 + 0.65 * (j + 0.5) / len(kinds), kind) for j, kind in enumerate(kinds)]


def run_chaos(opts: ChaosOptions, command: str = "") -> ChaosReport:
    started = time.monotonic()
    started_wall = time.time()
    run_id = f"{opts.seed}-{uuid.uuid4().hex[:6]}"
    own_workdir = opts.workdir is None
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="chaos-", dir=_tmp_root()))
    workdir.mkdir(parents=True, exist_ok=True)
    kafka_secret = "chaos-sasl-" + secrets.token_urlsafe(24)
    capture_path = workdir / "chaos-driver.log"
    undo_logging = _configure_logging(logging.FileHandler(capture_path))
    previous_secret_env = os.environ.get(KAFKA_SECRET_ENV)
    os.environ[KAFKA_SECRET_ENV] = kafka_secret
    rng = random.Random(opts.seed)
    try:
        with contextlib.ExitStack() as stack:
            s3 = stack.enter_context(S3Server(buckets=[BUCKET, PRIVATE_BUCKET], workdir=workdir / "s3"))
            secrets_to_find = [kafka_secret, s3.secret_key]
            broker = stack.enter_context(Broker(s3=s3, bucket="tansu-chaos", workdir=workdir / "broker"))
            return _run(opts, command, stack, s3, broker, workdir, run_id, secrets_to_find, rng, started, started_wall)
    finally:
        undo_logging()
        if previous_secret_env is None:
            os.environ.pop(KAFKA_SECRET_ENV, None)
        else:
            os.environ[KAFKA_SECRET_ENV] = previous_secret_env
        if own_workdir and not opts.keep_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def _tmp_root() -> Path:
    root = REPO / ".tmp"
    root.mkdir(exist_ok=True)
    return root


def _run(
    opts: ChaosOptions,
    command: str,
    stack: contextlib.ExitStack,
    s3: S3Server,
    broker: Broker,
    workdir: Path,
    run_id: str,
    secrets_to_find: list[str],
    rng: random.Random,
    started: float,
    started_wall: float,
) -> ChaosReport:
    from workers.chaos_proxy import ChaosProxy, FaultPlan
    from workers.kafkaclient import ensure_topics

    plan = FaultPlan(
        error_rate=opts.s3_error_rate, error_status=503, drop_rate=opts.s3_drop_rate,
        truncate_rate=opts.s3_truncate_rate, delay_rate=opts.s3_delay_rate, delay_s=opts.s3_delay_s,
    )  # fmt: skip
    proxy = stack.enter_context(ChaosProxy(s3.endpoint_url, FaultPlan(), seed=opts.seed))
    settings = chaos_settings(
        opts, bootstrap=broker.bootstrap_servers, s3_endpoint=proxy.url, run_id=run_id, kafka_secret=secrets_to_find[0]
    )
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic], partitions=opts.partitions)
    ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic], partitions=1)

    corpus = build_corpus(opts, settings.limits, run_id)
    client = s3.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=item[0][0], Key=item[0][1], Body=item[1]), corpus.objects.items()))
    log.info("chaos %s: %d requests, %d objects uploaded", run_id, len(corpus.cases), len(corpus.objects))

    app_name = f"chaos-{run_id}"
    stack.enter_context(replicas_app(settings, app_name, _tmp_root() / "ray"))
    sampler = MemorySampler()
    sampler.start()
    stack.callback(sampler.stop)

    settings_path = workdir / "settings.json"
    data = settings.model_dump(mode="json")
    data["kafka"].pop("sasl_password")  # the workers read it from the environment
    settings_path.write_text(json.dumps(data))
    child_env = {**os.environ, **{k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}}
    child_env.pop("AWS_ENDPOINT_URL", None)  # fetches go to the proxy named in the settings
    workers: list[ConsumerWorker] = []

    def spawn() -> ConsumerWorker:
        worker = ConsumerWorker(len(workers), workdir, settings_path, app_name, child_env).start()
        workers.append(worker)
        return worker

    stack.callback(lambda: [w.kill() for w in workers])
    for _ in range(opts.consumers):
        spawn()
    for w in workers:
        w.wait_ready()
    proxy.set_plan(plan)  # faults from here on: the uploads above went straight to S3

    progress = CommitProgress(settings, opts.partitions)
    stack.callback(progress.close)
    feeder = Feeder(settings, corpus.cases, progress.done, lead=max(100, 4 * opts.max_in_flight * opts.consumers))
    feeder.start()
    stack.callback(feeder.stop)

    faults: Counter[str] = Counter()
    killed_replicas: list[str] = []
    unexpected_exits: list[str] = []
    deadline = time.monotonic() + opts.deadline_s
    total = len(corpus.cases)

    def check_workers() -> str | None:
        for w in workers:
            code = w.exit_code()
            if code is not None and not w.killed and w.name not in {e.split(":")[0] for e in unexpected_exits}:
                unexpected_exits.append(f"{w.name}: exited with {code}")
        return None

    try:
        half_flipped = False
        for fault in fault_schedule(opts):
            if not half_flipped and fault.at >= 0.5:
                # Half the run answers 503 (SlowDown), the other half 500 (InternalError).
                proxy.set_plan(FaultPlan(**{**asdict(plan), "error_status": 500}))
                half_flipped = True
            wait_until(
                lambda: check_workers() or progress.done() >= fault.at * total,
                timeout_s=max(1.0, deadline - time.monotonic()), interval_s=0.1,
                what=f"{fault.at:.0%} of outcomes before {fault.kind}",
            )  # fmt: skip
            log.info("chaos: injecting %s at %d/%d committed", fault.kind, progress.done(), total)
            if fault.kind == "replica_kill":
                killed_replicas.append(kill_one_replica(app_name, rng))
            elif fault.kind == "consumer_kill":
                live = [w for w in workers if w.exit_code() is None]
                rng.choice(live).kill()
                spawn()  # joins the group when it is up; the stream does not wait for it
            elif fault.kind == "broker_restart":
                restart_broker(broker)
            faults[fault.kind] += 1
        if not half_flipped:
            proxy.set_plan(FaultPlan(**{**asdict(plan), "error_status": 500}))
        wait_until(
            lambda: check_workers() or (feeder.done.is_set() and progress.covers(feeder.coordinates)),
            timeout_s=max(1.0, deadline - time.monotonic()), interval_s=0.1, what="every request committed",
        )  # fmt: skip
        for w in workers:
            if not w.killed:
                w.wait_ready(timeout_s=max(1.0, deadline - time.monotonic()))
        wait_until(
            lambda: len(set(replica_actor_names(app_name)) - set(killed_replicas)) >= settings.replicas.num_replicas,
            timeout_s=max(1.0, deadline - time.monotonic()), interval_s=0.2, what="Serve to replace killed replicas",
        )  # fmt: skip
    except (TimeoutError, RuntimeError) as e:
        log.error("chaos: %s", e)
        unexpected_exits.append(f"run: {e}")
    finally:
        feeder.stop()
        feeder.join(30)

    # Graceful end: workers drain and commit, then markers close the outcome topics.
    for w in workers:
        code = w.terminate(timeout_s=90)
        if code not in (0, None) and not w.killed:
            unexpected_exits.append(f"{w.name}: exit code {code} on SIGTERM")
    collector = Collector(settings, secrets_to_find)
    try:
        produce_end_markers(settings)
        collector.start()
        wait_until(lambda: len(collector.markers) == 2, timeout_s=180, interval_s=0.1, what="end markers read back")
    except (TimeoutError, RuntimeError) as e:
        unexpected_exits.append(f"collector: {e}")
    collector.stop()
    sampler.stop()
    proxy_counts = proxy.counts()
    error_statuses = Counter(str(s.status) for s in proxy.seen if s.outcome == "error")
    faults_report: dict[str, Any] = {
        "replica_kills": faults["replica_kill"],
        "consumer_kills": faults["consumer_kill"],
        "broker_restarts": faults["broker_restart"],
        "s3_requests": sum(proxy_counts.values()),
        **{f"s3_{k}": v for k, v in sorted(proxy_counts.items())},
        **{f"s3_error_{k}": v for k, v in sorted(error_statuses.items())},
        "feeder_resends": feeder.resends,
        "acks_without_offset": feeder.acks_without_offset,
        "collector_rereads": collector.rereads,
    }
    for problem in (feeder.error, collector.error):
        if problem is not None:
            unexpected_exits.append(f"{type(problem).__name__}: {problem}")

    log_files = [workdir / "chaos-driver.log", *(w.log_path for w in workers), broker.workdir / "tansu.out"]
    for handler in logging.getLogger().handlers:
        handler.flush()
    files, lines, file_leaks = scan_files(log_files + _ray_log_files(started_wall), secrets_to_find)
    inference_retries = sum(w.log_path.read_text(errors="replace").count("inference attempt") for w in workers)
    return evaluate(
        opts, command, corpus, feeder, collector, settings, faults_report, sampler.report_mb(),
        {"log_files": files, "log_lines": lines, "output_records": collector.records_scanned},
        file_leaks + [f"output {x}" for x in collector.leaks], unexpected_exits, inference_retries,
        [w.stats() for w in workers], time.monotonic() - started,
    )  # fmt: skip


def evaluate(
    opts: ChaosOptions,
    command: str,
    corpus: Corpus,
    feeder: Feeder,
    collector: Collector,
    settings: Settings,
    faults: dict[str, Any],
    peak_rss_mb: dict[str, float],
    scanned: dict[str, int],
    leaks: list[str],
    exits: list[str],
    inference_retries: int,
    worker_stats: list[dict[str, Any]],
    wall_time_s: float,
) -> ChaosReport:
    cases = corpus.cases
    # Identity: the unique id (every outcome's Kafka key is its request's id) plus the source
    # coordinate the outcome names. Coordinates from the producer's acks are only cross-checked:
    # Tansu acknowledged some produces with offset -1, and the re-sent copies' acks then named
    # offsets whose records were the originals (their outcomes named other coordinates).
    case_by_key = {c.id.encode(): c for c in cases}
    by_key: dict[bytes, list[Outcome]] = defaultdict(list)
    for outcome in collector.outcomes:
        by_key[outcome.key or b""].append(outcome)
    stray = [o for key, outs in by_key.items() if key not in case_by_key for o in outs]
    lost = [c for c in cases if c.id.encode() not in by_key]
    acked_at = {cases[i].id: co for co, i in feeder.coordinates.items()}
    unknown = [
        o for key, outs in by_key.items() if key in case_by_key for o in outs
        if o.coordinate != acked_at.get(case_by_key[key].id)
    ]  # fmt: skip
    wrong: list[str] = []
    codes: Counter[str] = Counter()
    duplicates = 0
    captioned_awkward: set[str] = set()
    for key, outcomes in by_key.items():
        case = case_by_key.get(key)
        if case is None:
            continue
        # A redelivery repeats a coordinate; a second coordinate is a second input copy.
        duplicates += len(outcomes) - len({o.coordinate for o in outcomes})
        if case.kind.startswith("awkward_") and all(o.code == RESULT for o in outcomes):
            captioned_awkward.add(case.kind)
        for o in outcomes:
            codes[o.code] += 1
            if o.code != case.expected:
                wrong.append(f"{case.kind} {case.id}: expected {case.expected}, got {o.code} ({_message(o)})")
            elif case.size is not None and (o.body.get("width"), o.body.get("height")) != case.size:
                wrong.append(f"{case.kind} {case.id}: size {o.body.get('width')}×{o.body.get('height')}, expected {case.size}")
    redelivering = faults["consumer_kills"] + faults["broker_restarts"]
    bound = opts.max_in_flight * max(1, redelivering)
    awkward = {c.kind for c in cases if c.kind.startswith("awkward_")}
    kinds_with_wrong = {w.split()[0] for w in wrong}
    poison_kinds = {c.kind for c in cases if c.expected != RESULT}
    worker_peak_mb = peak_rss_mb.get("consumer_workers_largest_process", 0.0)
    checks = [
        Check("no request lost", not lost, f"{len(lost)} lost" + (f": {_lost_summary(lost)}" if lost else "")),
        Check("no stray outcomes", not stray, f"{len(stray)} outcome(s) keyed by no request id"),
        Check("every outcome has the expected code", not wrong, "; ".join(wrong[:5]) or "all match"),
        Check(
            "each poison kind got its code",
            poison_kinds.isdisjoint(kinds_with_wrong),
            f"{len(poison_kinds - kinds_with_wrong)}/{len(poison_kinds)} kinds right",
        ),
        Check("awkward valid images captioned", captioned_awkward == awkward, ", ".join(sorted(captioned_awkward))),
        Check(
            "no inference_failed / fetch_failed from injected faults",
            codes["inference_failed"] == 0 and codes["fetch_failed"] == 0,
            f"inference_failed={codes['inference_failed']} fetch_failed={codes['fetch_failed']}",
        ),
        Check(
            "duplicates within bound",
            duplicates <= bound,
            f"{duplicates} ≤ {bound} (max_in_flight {opts.max_in_flight} × {max(1, redelivering)} consumer kills + broker restarts)",
        ),
        Check("no secret in logs or outputs", not leaks, "; ".join(leaks[:5]) or f"{scanned}"),
        Check(
            "worker memory bounded",
            0 < worker_peak_mb <= opts.max_worker_rss_mb,
            f"largest consumer worker peak {worker_peak_mb:.0f} MB ≤ {opts.max_worker_rss_mb} MB",
        ),
        Check("workers survived every fault", not exits, "; ".join(exits) or "no unexpected exit"),
        Check(
            "faults injected as asked",
            (faults["replica_kills"], faults["consumer_kills"], faults["broker_restarts"])
            == (opts.kill_replicas, opts.kill_consumers, opts.broker_restarts),
            f"{faults['replica_kills']} replica kills, {faults['consumer_kills']} consumer kills, {faults['broker_restarts']} broker restarts",
        ),
    ]
    return ChaosReport(
        command=command,
        seed=opts.seed,
        requests=len(cases),
        requests_by_kind=dict(sorted(Counter(c.kind for c in cases).items())),
        faults=faults,
        settings_raised={
            "worker.inference_attempts": settings.worker.inference_attempts,
            "s3.max_attempts": settings.s3.max_attempts,
            "worker.max_in_flight": settings.worker.max_in_flight,
            "kafka.commit_interval_s": settings.kafka.commit_interval_s,
            "worker_window_peaks": [s.get("window_peak") for s in worker_stats if s],
        },
        results=codes[RESULT],
        dead_letters_by_code=dict(sorted((k, v) for k, v in codes.items() if k != RESULT)),
        outcomes=sum(codes.values()),
        lost=len(lost),
        duplicates=duplicates,
        duplicate_bound=bound,
        unknown_outcomes=len(unknown),
        wrong_codes=wrong[:50],
        inference_retries=inference_retries,
        peak_rss_mb=peak_rss_mb,
        secrets_scanned=scanned,
        secret_leaks=leaks[:50],
        worker_exits=exits,
        wall_time_s=round(wall_time_s, 1),
        checks=checks,
    )


def _lost_summary(lost: list[Case]) -> str:
    return f"kinds {dict(Counter(c.kind for c in lost).most_common(5))}; ids {[c.id for c in lost[:5]]}"


def _message(outcome: Outcome) -> str:
    error = outcome.body.get("error") or {}
    return str(error.get("message", ""))[:160]


# --- output ---------------------------------------------------------------------------------


def print_report(report: ChaosReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chaos run (seed {report.seed})", show_lines=False)
    table.add_column("measure", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("command", report.command),
        ("requests", report.requests),
        ("faults", ", ".join(f"{k}={v}" for k, v in report.faults.items())),
        ("results", report.results),
        ("dead letters", ", ".join(f"{k}={v}" for k, v in report.dead_letters_by_code.items())),
        ("lost", report.lost),
        ("duplicates", f"{report.duplicates} (bound {report.duplicate_bound})"),
        ("inference retries", report.inference_retries),
        ("peak RSS (MB)", ", ".join(f"{k}={v}" for k, v in report.peak_rss_mb.items())),
        ("secret scan", ", ".join(f"{k}={v}" for k, v in report.secrets_scanned.items())),
        ("settings", ", ".join(f"{k}={v}" for k, v in report.settings_raised.items())),
        ("wall time (s)", report.wall_time_s),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for check in report.checks:
        table.add_row(("[green]✔ " if check.ok else "[red]✘ ") + check.name + "[/]", check.detail)
    Console().print(table)


def write_report(report: ChaosReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")


def command_line(argv: list[str] | None = None) -> str:
    return "captioner " + shlex.join((argv if argv is not None else sys.argv)[1:])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "consumer-worker":
        raise SystemExit(consumer_worker_main(sys.argv[2:]))
    raise SystemExit("usage: python -m workers.chaos consumer-worker ... (the chaos run itself is `captioner chaos`)")
