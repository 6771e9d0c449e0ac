"""The chaos run itself: start everything, stream the requests, inject the faults, end gracefully,
read every outcome back and evaluate.

Phases, each given the one `RunState`:
1. `_start`: S3 (SeaweedFS) and a Tansu broker with DURABLE `s3://` storage on it, the fault proxy
   in front of S3 for the workers' fetches, topics, the request mix uploaded, the run's replica
   app on Ray, the consumer worker processes;
2. `_inject_faults`: the feeder streams the requests a bounded distance ahead of the committed
   progress while the faults land at their points of the stream, then waits until every request
   is committed and Serve replaced the killed replicas;
3. `_finish`: SIGTERM (the workers drain and commit), end markers, a fresh read of every outcome;
4. `_observe` + `report.evaluate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from harness.chaos.corpus import build_corpus
from harness.chaos.faults import (
    ReplicaHangs,
    fault_schedule,
    kill_one_replica,
    replica_actor_names,
    replica_pids,
    replicas_app,
    restart_broker,
)
from harness.chaos.observe import (
    MemorySampler,
    configure_logging,
    ray_log_files,
    scan_files,
)
from harness.chaos.options import (
    BUCKET,
    KAFKA_SECRET_ENV,
    PRIVATE_BUCKET,
    ChaosOptions,
    chaos_settings,
    tmp_root,
)
from harness.chaos.proxy import ChaosProxy, FaultPlan
from harness.chaos.report import ChaosReport, evaluate, worker_counters
from harness.chaos.state import Observations, RunState
from harness.chaos.stream import Collector, CommitProgress, Feeder, produce_end_markers
from workers.embedded import Broker, S3Server, wait_until

log = logging.getLogger(__name__)


def run_chaos(opts: ChaosOptions, command: str = "") -> ChaosReport:
    started, started_wall = time.monotonic(), time.time()
    own_workdir = opts.workdir is None
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="chaos-", dir=tmp_root()))
    workdir.mkdir(parents=True, exist_ok=True)
    kafka_secret = "chaos-sasl-" + secrets.token_urlsafe(24)
    undo_logging = configure_logging(logging.FileHandler(workdir / "chaos-driver.log"))
    previous_secret_env = os.environ.get(KAFKA_SECRET_ENV)
    os.environ[KAFKA_SECRET_ENV] = kafka_secret
    try:
        with contextlib.ExitStack() as stack:
            state = _start(stack, opts, command, workdir, kafka_secret, (started, started_wall))
            _inject_faults(state)
            _finish(state)
            return evaluate(state, _observe(state))
    finally:
        undo_logging()
        if previous_secret_env is None:
            os.environ.pop(KAFKA_SECRET_ENV, None)
        else:
            os.environ[KAFKA_SECRET_ENV] = previous_secret_env
        if own_workdir and not opts.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _start(
    stack: contextlib.ExitStack,
    opts: ChaosOptions,
    command: str,
    workdir: Path,
    kafka_secret: str,
    started: tuple[float, float],
) -> RunState:
    """Everything up and the consumer workers ready; the S3 faults are not on yet."""
    from workers.kafkaclient import ensure_topics

    s3 = stack.enter_context(S3Server(buckets=[BUCKET, PRIVATE_BUCKET], workdir=workdir / "s3"))
    broker = stack.enter_context(Broker(s3=s3, bucket="tansu-chaos", workdir=workdir / "broker"))
    secrets_to_find = [kafka_secret, s3.secret_key]
    run_id = f"{opts.seed}-{uuid.uuid4().hex[:6]}"
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
        list(
            pool.map(
                lambda item: client.put_object(Bucket=item[0][0], Key=item[0][1], Body=item[1]), corpus.objects.items()
            )
        )
    log.info("chaos %s: %d requests, %d objects uploaded", run_id, len(corpus.cases), len(corpus.objects))

    app_name = f"chaos-{run_id}"
    stack.enter_context(replicas_app(settings, app_name, tmp_root() / "ray"))
    hangs = ReplicaHangs(opts.hang_s)
    stack.callback(hangs.resume_all)  # before the app is deleted: no replica is left stopped
    sampler = MemorySampler()
    sampler.start()
    stack.callback(sampler.stop)

    settings_path = workdir / "settings.json"
    data = settings.model_dump(mode="json")
    data["kafka"].pop("sasl_password")  # the workers read it from the environment
    settings_path.write_text(json.dumps(data))
    child_env = {
        **os.environ,
        **{k: v for k, v in s3.env().items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
    }
    child_env.pop("AWS_ENDPOINT_URL", None)  # fetches go to the proxy named in the settings

    progress = CommitProgress(settings, opts.partitions)
    stack.callback(progress.close)
    state = RunState(
        opts=opts, command=command, run_id=run_id, workdir=workdir, secrets=secrets_to_find,
        rng=random.Random(opts.seed), started=started[0], started_wall=started[1], s3=s3, broker=broker,
        proxy=proxy, settings=settings, settings_path=settings_path, child_env=child_env, corpus=corpus,
        app_name=app_name, sampler=sampler, progress=progress, hangs=hangs,
        plan=FaultPlan(
            error_rate=opts.s3_error_rate, error_status=503, drop_rate=opts.s3_drop_rate,
            truncate_rate=opts.s3_truncate_rate, delay_rate=opts.s3_delay_rate, delay_s=opts.s3_delay_s,
            drip_rate=opts.s3_drip_rate, drip_bytes=opts.s3_drip_bytes, drip_interval_s=opts.s3_drip_interval_s,
        ),
        feeder=Feeder(settings, corpus.cases, progress.done, lead=max(100, 4 * opts.max_in_flight * opts.consumers)),
        collector=Collector(settings, secrets_to_find),
    )  # fmt: skip
    stack.callback(lambda: [w.kill() for w in state.workers])
    stack.callback(state.feeder.stop)
    for _ in range(opts.consumers):
        state.spawn_worker()
    for w in state.workers:
        w.wait_ready()
    return state


def _inject_faults(state: RunState) -> None:
    """Stream the requests with the faults landing mid-stream; wait until all is committed."""
    opts, proxy = state.opts, state.proxy
    proxy.set_plan(state.plan)  # faults from here on: the uploads went straight to S3
    state.feeder.start()
    second_half = FaultPlan(**{**asdict(state.plan), "error_status": 500})

    def progressed(fraction: float) -> bool:
        state.note_unexpected_exits()
        return state.progress.done() >= fraction * state.total

    def all_committed() -> bool:
        state.note_unexpected_exits()
        return state.feeder.done.is_set() and state.progress.covers(state.feeder.coordinates)

    try:
        half_flipped = False
        for fault in fault_schedule(opts):
            if not half_flipped and fault.at >= 0.5:
                # Half the run answers 503 (SlowDown), the other half 500 (InternalError).
                proxy.set_plan(second_half)
                half_flipped = True
            wait_until(
                lambda at=fault.at: progressed(at), timeout_s=state.remaining_s(), interval_s=0.1,
                what=f"{fault.at:.0%} of outcomes before {fault.kind}",
            )  # fmt: skip
            log.info("chaos: injecting %s at %d/%d committed", fault.kind, state.progress.done(), state.total)
            if fault.kind == "replica_kill":
                state.killed_replicas.append(kill_one_replica(state.app_name, state.rng))
            elif fault.kind == "consumer_kill":
                state.rng.choice([w for w in state.workers if w.exit_code() is None and not w.drained]).kill()
                state.spawn_worker()  # joins the group when it is up; the stream does not wait for it
            elif fault.kind == "broker_restart":
                restart_broker(state.broker)
            elif fault.kind == "replica_hang":
                _wait_for_whole_replica_set(state)
                felt = partial(_timed_out_since, state, _call_timeouts(state))
                state.hung_replicas.extend(pids := state.hangs.hang(state.app_name, felt))
                log.info("chaos: replicas %s stopped for %.0f s at least, until a call times out", pids, opts.hang_s)
            elif fault.kind == "throttle_burst":
                proxy.throttle_for(opts.throttle_burst_s)
            elif fault.kind == "drain_rebalance":
                _drain_during_rebalance(state)
            state.faults[fault.kind] += 1
        if not half_flipped:
            proxy.set_plan(second_half)
        wait_until(
            all_committed, timeout_s=state.remaining_s(), interval_s=0.1, what="every request committed",
        )  # fmt: skip
        for w in state.workers:
            if not w.killed and not w.drained:
                w.wait_ready(timeout_s=state.remaining_s())
        _wait_for_whole_replica_set(state)
    except (TimeoutError, RuntimeError) as e:
        log.error("chaos: %s", e)
        state.exits.append(f"run: {e}")
    finally:
        state.feeder.stop()
        state.feeder.join(30)


def _timed_out_since(state: RunState, before: float) -> bool:
    return _call_timeouts(state) > before


def _call_timeouts(state: RunState) -> float:
    """Replica calls timed out so far, over every worker's latest metrics dump (killed ones too)."""
    return sum(w.metrics().get("captioner_replica_call_timeouts_total", 0.0) for w in list(state.workers))


def _wait_for_whole_replica_set(state: RunState) -> None:
    """Until Serve has replaced every killed replica (and the replacements have processes)."""
    replicas = state.settings.replicas.num_replicas
    wait_until(
        lambda: len(set(replica_actor_names(state.app_name)) - set(state.killed_replicas)) >= replicas
        and len(replica_pids(state.app_name)) >= replicas,
        timeout_s=state.remaining_s(), interval_s=0.2, what="Serve to replace killed replicas",
    )  # fmt: skip


def _drain_during_rebalance(state: RunState) -> None:
    """A replacement joins the group and, as its join starts the rebalance, a live worker is sent
    SIGTERM: it drains (keeps polling, so it takes part in the rebalance) and must exit 0."""
    live = [
        w for w in state.workers if w.exit_code() is None and not w.killed and not w.drained and w.ready_path.exists()
    ]
    victim = state.rng.choice(live)
    replacement = state.spawn_worker()
    replacement.wait_ready(timeout_s=state.remaining_s())  # subscribed: its join is under way
    victim.sigterm()
    log.info("chaos: %s draining on SIGTERM while %s joins", victim.name, replacement.name)


def _finish(state: RunState) -> None:
    """Graceful end: workers drain and commit, then markers close the outcome topics and a fresh
    reader reads every outcome up to them."""
    for w in state.workers:
        killed_before = w.killed  # terminate() kills one that does not stop in time: that counts
        code = w.terminate(timeout_s=90)
        if code not in (0, None) and not killed_before:
            when = "after its mid-run SIGTERM drain" if w.drained else "on SIGTERM"
            state.exits.append(f"{w.name}: exit code {code} {when}")
    collector = state.collector
    try:
        produce_end_markers(state.settings)
        collector.start()
        wait_until(lambda: len(collector.markers) == 2, timeout_s=180, interval_s=0.1, what="end markers read back")
    except (TimeoutError, RuntimeError) as e:
        state.exits.append(f"collector: {e}")
    collector.stop()
    state.sampler.stop()


def _observe(state: RunState) -> Observations:
    """What the run measured besides the outcomes: faults, memory, the secret scan, worker counters."""
    proxy_counts = state.proxy.counts()
    error_statuses = Counter(str(s.status) for s in state.proxy.seen if s.outcome == "error")
    faults: dict[str, Any] = {
        "replica_kills": state.faults["replica_kill"],
        "consumer_kills": state.faults["consumer_kill"],
        "broker_restarts": state.faults["broker_restart"],
        "replica_hangs": state.faults["replica_hang"],
        "replica_processes_stopped": len(state.hung_replicas),
        "throttle_bursts": state.faults["throttle_burst"],
        "drain_rebalances": state.faults["drain_rebalance"],
        "s3_requests": sum(proxy_counts.values()),
        **{f"s3_{k}": v for k, v in sorted(proxy_counts.items())},
        **{f"s3_error_{k}": v for k, v in sorted(error_statuses.items())},
        "feeder_resends": state.feeder.resends,
        "acks_without_offset": state.feeder.acks_without_offset,
        "collector_rereads": state.collector.rereads,
    }
    for problem in (state.feeder.error, state.collector.error):
        if problem is not None:
            state.exits.append(f"{type(problem).__name__}: {problem}")
    log_files = [state.workdir / "chaos-driver.log", *(w.log_path for w in state.workers),
                 state.broker.workdir / "tansu.out"]  # fmt: skip
    for handler in logging.getLogger().handlers:
        # Only what this run writes to disk: another handler's stream (a test runner's captured
        # stderr, say) may already be closed.
        if isinstance(handler, logging.FileHandler):
            handler.flush()
    files, lines, file_leaks = scan_files(log_files + ray_log_files(state.started_wall), state.secrets)
    worker_metrics = {}
    for w in state.workers:
        worker_metrics[w.name] = worker_counters(w.metrics())
    return Observations(
        faults=faults,
        peak_rss_mb=state.sampler.report_mb(),
        scanned={"log_files": files, "log_lines": lines, "output_records": state.collector.records_scanned},
        leaks=file_leaks + [f"output {x}" for x in state.collector.leaks],
        worker_stats=[w.stats() for w in state.workers],
        worker_metrics=worker_metrics,
        wall_time_s=time.monotonic() - state.started,
    )
