"""`captioner bench --mode scale`: does the two-tier topology scale out? Measured on this machine.

N ingest processes (`captioner run` with `replicas.endpoint`, exactly the production path: HTTP
micro-batches to the Serve app's batch endpoint, no Ray in the ingest) against M Serve replicas
on local Ray with fake GPUs, on the real embedded broker and S3 server. The replicas run the
STAND-IN model (workers/model/stand_in.py): every batch sleeps a fixed latency profile, so two
cores can stand in for many GPUs. It measures the plumbing — Kafka, S3, decode/resize, the HTTP
frame, Serve's proxy and router — NOT the model; every output says so.

Parts:
1. images/s for 1x1, 2x2 and 4x4 (ingests x replicas), the efficiency against linear
   (E = rate(NxN) / (N x rate(1x1))) and the CPU use (the machine's, and this bench's own
   processes'); each run checks its own consistency: every request answered exactly once, no
   dead letter, and it reports the calls the ingests had to retry. The rates are the steady
   state: answers between the 10th and 90th percentile of their arrival, so the pipeline's fill
   and drain stay out (the whole-run rate is printed beside it). The same profile, images per
   ingest and ingest settings serve every topology; requests go round-robin to 4 partitions.
2. (full run) one ingest process against a zero-latency stand-in with the sample photographs:
   the ingest pod's img/s and CPU per image, the figure docs/deployment.md sizes KEDA from.
3. (full run) Serve autoscaling on real Serve: from 1 replica under a backlog of calls up to the
   maximum, and back down after; the replica count over time.
Also the wire format's cost (bytes and CPU per image) for what the batch endpoint could carry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from harness.bench.autoscale import autoscale
from harness.bench.common import SAMPLES
from harness.bench.cpu_use import CpuSnapshot, CpuUse
from harness.bench.serve_app import BATCH, PREFIX, deploy_app, replica_settings
from harness.bench.wire_costs import wire_costs
from workers.config import ReplicasConfig, Settings
from workers.cpu import cpu_features
from workers.model.stand_in import LatencyProfile

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
# 1500 ms + 2 ms/image: a 16-image batch takes 1.53 s, 10.4 img/s per replica, 42 img/s at 4x4,
# where this bench's own processes used ~40 % of the 2 cores (~22 ms of CPU per image in all:
# ingest, proxy, ingress, broker, S3 server, Ray): the replicas' profile bounds each run, as
# GPUs would, not the machine. (Earlier runs at this profile measured E = 0.60 at 96 % CPU:
# the ingests sprayed partial calls that the ingress refused and they retried; see the
# ReplicaClient's `max_calls`.)
PROFILE = LatencyProfile(1500, 2)
# The quick form (CI) checks consistency, not speed: a short profile keeps it short.
QUICK_PROFILE = LatencyProfile(300, 1)
# 20 full batches per replica: the steady window (answers 10 % to 90 %) spans 16 of them.
IMAGES_PER_INGEST = 320
QUICK_IMAGES_PER_INGEST = 32
NOTE = (
    "[bold yellow]stand-in model[/]: replicas sleep a fixed latency profile — this measures the plumbing, not the model"
)


# The steady state: answers between these quantiles of their arrival times. Before the first,
# the pipeline fills (the first call goes alone; the replicas' queues build); after the last,
# it drains (the last batches are partial). Both cost the same seconds at every topology, so a
# whole-run rate would understate the larger ones, whose runs are no longer; it is printed too.
STEADY_FROM, STEADY_TO = 0.1, 0.9


@dataclass
class PhaseResult:
    ingests: int
    replicas: int
    images: int
    answer_times: list[float]  # seconds from the first request sent, one per answer, sorted
    cpu: CpuUse
    answered_once: bool
    dead_letters: int
    retried_calls: int  # replica calls the ingests retried (refused, 503, timed out): 0 expected
    mean_batch: float  # images per replica batch, averaged over the images (as replicas report)
    ingest_cpu_s: float = 0.0  # CPU the ingest processes used during the phase

    @property
    def seconds(self) -> float:
        return self.answer_times[-1]

    @property
    def overall_rate(self) -> float:
        """Images over the whole run, first request to last answer (fill and drain included)."""
        return self.images / self.seconds

    @property
    def rate(self) -> float:
        """Steady-state images/s: answers between the STEADY_FROM and STEADY_TO quantiles."""
        first, last = int(STEADY_FROM * self.images), int(STEADY_TO * self.images) - 1
        return (last - first) / max(self.answer_times[last] - self.answer_times[first], 1e-9)


@dataclass
class ScaleReport:
    phases: list[PhaseResult] = field(default_factory=list)
    ingest_pod: dict[str, float] = field(default_factory=dict)
    autoscale: list[tuple[float, int, bool]] = field(default_factory=list)
    wire: dict[str, tuple[float, float]] = field(default_factory=dict)

    def efficiency(self, n: int, *, whole_run: bool = False) -> float:
        """rate(NxN) / (N x rate(1x1)), steady-state rates unless `whole_run`."""

        def rate(p: PhaseResult) -> float:
            return p.overall_rate if whole_run else p.rate

        base = next(rate(p) for p in self.phases if p.ingests == 1)
        top = next(rate(p) for p in self.phases if p.ingests == n)
        return top / (n * base)


# -- the inference tier on local Ray -----------------------------------------------------------


@contextlib.contextmanager
def _local_serve(proxy_url: str | None) -> Iterator[str]:
    """Serve on local Ray with 4 fake GPUs (or the caller's, when proxy_url is given)."""
    if proxy_url is not None:
        yield proxy_url
        return
    from ray import serve

    from workers.config import RayConfig
    from workers.embedded import free_port
    from workers.runner import start_ray

    # Ray starts its workers at nice 15 (RAY_worker_niceness), which would let the ingest
    # processes (nice 0) starve the proxy and the replicas on a small machine: level the field.
    os.environ.setdefault("RAY_worker_niceness", "0")
    start_ray(
        RayConfig(num_cpus=8, num_gpus=4, temp_dir=Path(tempfile.gettempdir()) / f"captioner-scale-{os.getpid()}")
    )
    import ray

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# -- ingest processes ----------------------------------------------------------------------------


class Ingest:
    """One `captioner run` process against the batch endpoint (no Ray in it)."""

    def __init__(self, settings: Settings, env: dict[str, str], workdir: Path):
        from workers.embedded import free_port

        self.metrics_port = free_port()
        cfg = settings.portable()
        cfg["metrics"] = {"port": self.metrics_port, "host": "127.0.0.1", "health_port": 0}
        path = workdir / f"ingest-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", "--config", str(path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def metric(self, sample: str) -> float:
        """One sample of this member's /metrics (name and labels as written there); 0 if absent."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"ingest exited {self.proc.returncode}: {self.proc.stderr.read().decode()[-2000:]}")
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()
        except OSError:
            return 0.0
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def assigned(self) -> int:
        """Partitions this member holds now (assigned minus revoked)."""
        events = 'captioner_rebalances_total{{event="{}"}}'
        return int(self.metric(events.format("assigned")) - self.metric(events.format("revoked")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _ingest_settings(broker: Any, s3: Any, endpoint: str, wait_s: float, **worker: Any) -> Settings:
    from workers.config import KafkaConfig, WorkerConfig

    tag = uuid.uuid4().hex[:8]
    return Settings(
        kafka=KafkaConfig(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic=f"scale-in-{tag}",
            output_topic=f"scale-out-{tag}",
            dead_letter_topic=f"scale-dlq-{tag}",
            group_id=f"scale-{tag}",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            commit_interval_s=0.5,
            poll_timeout_ms=100,
            create_topics=False,
            min_input_partitions=1,
        ),
        s3=s3.s3_config(allowed_buckets=["images"]),
        # While a call is in flight the ingest fills the next one for up to `wait_s`: the window
        # keeps several calls queued per replica, so waiting costs no throughput, and a full call
        # beats two small ones that a replica cannot merge past its batch size.
        replicas=ReplicasConfig(endpoint=endpoint, max_batch_size=BATCH, batch_wait_timeout_s=wait_s),
        worker=WorkerConfig(max_in_flight=8 * BATCH, cache_size=0, fetch_concurrency=8, **worker),
    )


def _phase(
    broker: Any,
    s3: Any,
    endpoint: str,
    profile: LatencyProfile,
    ingests: int,
    uris: list[str],
    count: int,
    workdir: Path,
    console: Console,
) -> tuple[PhaseResult, list[Ingest]]:
    from kafka import KafkaProducer

    from workers.contract import encode
    from workers.embedded import wait_until
    from workers.kafkaclient import ensure_topics

    settings = _ingest_settings(broker, s3, endpoint, wait_s=profile.batch_ms(BATCH) / 1000)
    kafka = settings.kafka
    ensure_topics(kafka, [kafka.input_topic], partitions=PARTITIONS)
    ensure_topics(kafka, [kafka.output_topic, kafka.dead_letter_topic])
    env = {
        **os.environ,
        **s3.env(),
        "USE_TF": "0",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    members = [Ingest(settings, env, workdir) for _ in range(ingests)]
    try:
        wait_until(
            lambda: [m.assigned() for m in members].count(0) == 0 and sum(m.assigned() for m in members) == PARTITIONS,
            timeout_s=90,
            what=f"{ingests} ingest(s) holding {PARTITIONS} partitions",
        )
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
        ids = [f"r{i}" for i in range(count)]
        retried = "captioner_inference_retries_total"
        retries0 = sum(m.metric(retried) for m in members)
        before = CpuSnapshot.take()
        start = time.perf_counter()
        # Round-robin over the partitions: every member gets the same share of the work.
        for i, rid in enumerate(ids):
            image = uris[i % len(uris)]
            producer.send(kafka.input_topic, encode({"id": rid, "image": image}), partition=i % PARTITIONS)
        producer.flush()
        producer.close()
        seen, dead, times = _collect(kafka, set(ids))
        cpu = CpuUse.between(before, CpuSnapshot.take())
        console.print(f"    CPU by process during {ingests}x{ingests}: {cpu.top()}")
        retries = int(sum(m.metric(retried) for m in members) - retries0)
        batched = sum(m.metric("captioner_batch_size_sum") for m in members)
        mean_batch = batched / max(sum(m.metric("captioner_batch_size_count") for m in members), 1)
    except BaseException:
        for m in members:
            m.stop()
        raise
    once = sorted(seen) == sorted(ids)
    answer_times = sorted(t - start for t in times)
    ingest_cpu = cpu.of([m.proc.pid for m in members])
    result = PhaseResult(ingests, 0, count, answer_times, cpu, once, dead, retries, mean_batch, ingest_cpu)
    return result, members


def _collect(kafka: Any, ids: set[str], timeout_s: float = 300) -> tuple[list[str], int, list[float]]:
    """Every outcome's id (duplicates kept), the dead-letter count, and when each id's first
    outcome came (time.perf_counter)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        kafka.output_topic,
        kafka.dead_letter_topic,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
    )
    seen: list[str] = []
    first_seen: dict[str, float] = {}
    dead = 0
    deadline = time.monotonic() + timeout_s
    try:
        while len(first_seen.keys() & ids) < len(ids) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=100).values():
                for r in records:
                    body = json.loads(r.value)
                    seen.append(body["id"])
                    first_seen.setdefault(body["id"], time.perf_counter())
                    dead += "error" in body
        # A short grace period: a duplicate arriving just after the last id still counts.
        for records in consumer.poll(timeout_ms=500).values():
            seen.extend(json.loads(r.value)["id"] for r in records)
    finally:
        consumer.close()
    return seen, dead, list(first_seen.values())


def _upload_small_images(s3: Any, count: int = 64) -> list[str]:
    from PIL import Image

    client = s3.client()
    rng = np.random.default_rng(0)
    uris = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        client.put_object(Bucket="images", Key=f"scale/{i}.png", Body=buf.getvalue())
        uris.append(f"s3://images/scale/{i}.png")
    return uris


# -- the benchmark -----------------------------------------------------------------------------


def run(
    quick: bool = False,
    console: Console | None = None,
    *,
    broker: Any = None,
    s3: Any = None,
    proxy_url: str | None = None,
) -> ScaleReport:
    """The whole benchmark (quick: 1x1 and 2x2, few images, no parts 2 and 3). Pass running
    servers (tests) or let it start its own embedded broker, S3 server and local Ray."""
    from workers.embedded import Broker, S3Server

    console = console or Console()
    report = ScaleReport()
    profile = QUICK_PROFILE if quick else PROFILE
    per = QUICK_IMAGES_PER_INGEST if quick else IMAGES_PER_INGEST
    console.print(
        f"[bold]bench scale[/] on {cpu_features().describe()} (the stand-in model does no matrix work); "
        f"load average {os.getloadavg()[0]:.1f} (machine CPU below includes anything else running here)"
    )
    console.print(NOTE)
    ideal = BATCH * 1000 / profile.batch_ms(BATCH)
    console.print(
        f"profile {profile.source}: {profile.batch_ms(BATCH):.0f} ms per {BATCH}-image batch, at most "
        f"{ideal:.1f} img/s per replica; {PARTITIONS} partitions; {per} images per ingest; rates are the "
        f"steady state (answers {STEADY_FROM:.0%} to {STEADY_TO:.0%}), E = rate(NxN) / (N x rate(1x1))"
    )
    report.wire = wire_costs()
    for name, (size, ms) in report.wire.items():
        console.print(f"  wire {name:26s} {size / 1000:8.1f} kB/image  {ms:6.2f} ms CPU/image")
    with contextlib.ExitStack() as stack:
        broker = broker or stack.enter_context(Broker())
        s3 = s3 or stack.enter_context(S3Server(buckets=["images"]))
        base_url = stack.enter_context(_local_serve(proxy_url))
        endpoint = base_url + PREFIX
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-scale-")))
        uris = _upload_small_images(s3)
        base = Settings(s3=s3.s3_config(allowed_buckets=["images"]), metrics={"port": 0})
        for n in [1, 2] if quick else [1, 2, 4]:
            deploy_app(replica_settings(base, profile, n))
            result, members = _phase(broker, s3, endpoint, profile, n, uris, per * n, workdir, console)
            result.replicas = n
            for m in members:
                m.stop()
            report.phases.append(result)
            console.print(
                f"  {n}x{n}: {result.rate:5.1f} img/s steady ({result.rate / (n * ideal):.0%} of the profile's "
                f"{n * ideal:.1f}); {result.images} images in {result.seconds:.1f} s = {result.overall_rate:.1f} "
                f"img/s with fill and drain; mean batch {result.mean_batch:.1f} of {BATCH}; CPU: machine "
                f"{result.cpu.machine:.0%}, this bench's processes {result.cpu.own:.0%}, ingest "
                f"{result.ingest_cpu_s * 1000 / result.images:.1f} ms/img; retried calls {result.retried_calls}; "
                f"answered once: {result.answered_once}, dead letters: {result.dead_letters}"
            )
        if not quick:
            report.ingest_pod = _ingest_pod(broker, s3, endpoint, base, workdir, console)
            console.print("[bold]Serve autoscaling[/] (stand-in 200+1, target 1 call per replica, max 4):")
            report.autoscale = autoscale(endpoint, base, max_replicas=4, callers=8)
            shown = None
            for i, (t, count, on) in enumerate(report.autoscale):
                if (count, on) != shown or i == len(report.autoscale) - 1:  # changes, and the end
                    console.print(f"  t={t:5.1f} s  replicas {count}  {'backlog' if on else 'idle'}")
                    shown = (count, on)
    top = report.phases[-1].ingests
    console.print(NOTE)
    console.print(
        f"whole-run efficiency (fill and drain included): {report.efficiency(top, whole_run=True):.2f} at {top}x{top}"
    )
    console.print(f"scale efficiency: {report.efficiency(top):.2f} at {top}x{top}")
    return report


def _ingest_pod(
    broker: Any, s3: Any, endpoint: str, base: Settings, workdir: Path, console: Console
) -> dict[str, float]:
    """One ingest process, sample photographs, a zero-latency stand-in on 4 replicas: the
    ingest's own ceiling (img/s) and its CPU per image."""
    client = s3.client()
    uris = []
    for p in sorted(SAMPLES.glob("*.jpg")):
        client.put_object(Bucket="images", Key=f"photos/{p.name}", Body=p.read_bytes())
        uris.append(f"s3://images/photos/{p.name}")
    zero = LatencyProfile(0, 0)
    deploy_app(replica_settings(base, zero, 4))
    result, members = _phase(broker, s3, endpoint, zero, 1, uris, 600, workdir, console)
    for m in members:
        m.stop()
    figures = {
        "img_s": result.rate,
        "cpu_ms_per_image": result.ingest_cpu_s * 1000 / result.images,
        "machine_cpu": result.cpu.machine,
    }
    console.print(
        f"ingest pod (1 process, sample photos ~640x480 JPEG, zero-latency stand-in): "
        f"{figures['img_s']:.0f} img/s, {figures['cpu_ms_per_image']:.1f} ms of ingest CPU per image, "
        f"machine CPU {result.cpu.machine:.0%}, answered once: {result.answered_once}"
    )
    return figures
