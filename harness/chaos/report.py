"""The chaos run's verdict: every check it makes, the report (a table, and JSON), and `evaluate`,
which turns what the run saw into both.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.chaos.corpus import Case
from harness.chaos.faults import fault_counts
from workers.outcomes import RESULT, Outcome

if TYPE_CHECKING:
    from harness.chaos.state import Observations, RunState

RETRIES_SAMPLE = "captioner_inference_retries_total"
# The worker counters the report carries per worker (Prometheus sample names; a labelled
# counter also by label, as `name{label=value}`).
WORKER_COUNTERS = (
    "captioner_consumed_total",
    "captioner_results_total",
    "captioner_dead_letters_total",
    RETRIES_SAMPLE,
    "captioner_replica_call_timeouts_total",
    "captioner_fetch_retries_total",
    "captioner_produce_errors_total",
    "captioner_compact_dead_letters_total",
    "captioner_rebalances_total",
)
FETCH_RETRIES = "captioner_fetch_retries_total"


def worker_counters(counters: dict[str, float]) -> dict[str, float]:
    """The report's counters out of a worker's registry dump ({} if it never wrote one)."""
    if not counters:
        return {}
    out = {name: counters.get(name, 0.0) for name in WORKER_COUNTERS}
    out.update({k: v for k, v in counters.items() if k.split("{")[0] in WORKER_COUNTERS and "{" in k})
    return out


def retries_by_fault(worker_metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, int]]:
    """What each fault class cost in retries, summed over every worker that ran: S3 faults by the
    kind of fetch retry they cause, replica faults by replica-call retries and timeouts, broker
    restarts by produce errors (re-sent) and compact dead letters."""
    total: Counter[str] = Counter()
    for counters in worker_metrics.values():
        total.update(counters)

    def n(name: str) -> int:
        return int(total.get(name, 0))

    return {
        "s3 503 SlowDown (error rate, first half) + throttling bursts": {
            "fetch retries, throttled": n(f"{FETCH_RETRIES}{{kind=throttled}}")},
        "s3 500 InternalError (error rate, second half)": {
            "fetch retries, server_error": n(f"{FETCH_RETRIES}{{kind=server_error}}")},
        "s3 dropped connections": {"fetch retries, connection": n(f"{FETCH_RETRIES}{{kind=connection}}")},
        "s3 bodies cut short": {"fetch retries, truncated": n(f"{FETCH_RETRIES}{{kind=truncated}}")},
        "s3 dripping GETs": {"fetch retries, deadline": n(f"{FETCH_RETRIES}{{kind=deadline}}")},
        "replica kills + hung replicas": {
            "inference retries": n(RETRIES_SAMPLE),
            "replica call timeouts": n("captioner_replica_call_timeouts_total"),
        },
        "broker restarts": {
            "produce errors, transport (re-sent)": n("captioner_produce_errors_total{kind=transport}"),
            "produce errors, record": n("captioner_produce_errors_total{kind=record}"),
            "compact dead letters": n("captioner_compact_dead_letters_total"),
        },
    }  # fmt: skip


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
    inference_retries: int  # captioner_inference_retries_total summed over the consumer workers
    retries_by_fault: dict[str, dict[str, int]]  # fault class → retry counters it drove (all workers)
    worker_metrics: dict[str, dict[str, float]]  # per worker: the counters below, from its registry dump
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


@dataclass
class Matching:
    """The outcomes read back, matched against the requests produced."""

    lost: list[Case]
    stray: list[Outcome]  # keyed by no request id
    unknown: list[Outcome]  # at a coordinate the producer's ack did not name
    wrong: list[str]  # outcomes with another code (or image size) than expected
    codes: Counter[str]
    duplicates: int
    captioned_awkward: set[str]


def match_outcomes(cases: list[Case], outcomes: list[Outcome], acked: dict[tuple[str, int, int], int]) -> Matching:
    """Identity: the request's key (its unique id; every outcome's Kafka key is its request's
    key) plus the source coordinate the outcome names. Coordinates from the producer's acks
    (`acked`: coordinate → index into cases) are only cross-checked: Tansu acknowledged some
    produces with offset -1, and the re-sent copies' acks then named offsets whose records were
    the originals. An outcome whose key names no request (a compact dead letter drops a key over
    1 KB) is matched by the coordinate it names."""
    case_by_key = {c.key: c for c in cases}
    by_key: dict[bytes, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        key = outcome.key or b""
        if key not in case_by_key and outcome.coordinate in acked:
            key = cases[acked[outcome.coordinate]].key
        by_key[key].append(outcome)
    acked_at = {cases[i].id: co for co, i in acked.items()}
    found = Matching(
        lost=[c for c in cases if c.key not in by_key],
        stray=[o for key, outs in by_key.items() if key not in case_by_key for o in outs],
        unknown=[
            o for key, outs in by_key.items() if key in case_by_key for o in outs
            if o.coordinate != acked_at.get(case_by_key[key].id)
        ],  # fmt: skip
        wrong=[], codes=Counter(), duplicates=0, captioned_awkward=set(),
    )  # fmt: skip
    for key, outs in by_key.items():
        case = case_by_key.get(key)
        if case is None:
            continue
        # A redelivery repeats a coordinate; a second coordinate is a second input copy.
        found.duplicates += len(outs) - len({o.coordinate for o in outs})
        if case.size is not None and all(o.code == RESULT for o in outs):
            found.captioned_awkward.add(case.kind)
        for o in outs:
            found.codes[o.code] += 1
            if o.code != case.expected:
                found.wrong.append(f"{case.kind} {case.id}: expected {case.expected}, got {o.code} ({_message(o)})")
            elif case.size is not None and (o.body.get("width"), o.body.get("height")) != case.size:
                found.wrong.append(
                    f"{case.kind} {case.id}: size {o.body.get('width')}×{o.body.get('height')}, expected {case.size}"
                )
    return found


def evaluate(state: RunState, seen: Observations) -> ChaosReport:
    opts, cases, faults = state.opts, state.corpus.cases, seen.faults
    m = match_outcomes(cases, state.collector.outcomes, state.feeder.coordinates)
    # Each event that moves partitions or resets the group (a consumer kill, a broker restart, a
    # drain with a replacement joining) can redeliver at most each member's open window.
    redelivering = faults["consumer_kills"] + faults["broker_restarts"] + faults["drain_rebalances"]
    bound = opts.max_in_flight * opts.consumers * max(1, redelivering)
    awkward = {c.kind for c in cases if c.size is not None}
    header_problems = _header_problems(cases, state.collector.headers)
    asked = fault_counts(opts)
    felt_problems = _unfelt_faults(faults, retries_by_fault(seen.worker_metrics))
    kinds_with_wrong = {w.split()[0] for w in m.wrong}
    poison_kinds = {c.kind for c in cases if c.expected != RESULT}
    worker_peak_mb = seen.peak_rss_mb.get("consumer_workers_largest_process", 0.0)
    checks = [
        Check("no request lost", not m.lost, f"{len(m.lost)} lost" + (f": {_lost_summary(m.lost)}" if m.lost else "")),
        Check("no stray outcomes", not m.stray, f"{len(m.stray)} outcome(s) keyed by no request id"),
        Check("every outcome has the expected code", not m.wrong, "; ".join(m.wrong[:5]) or "all match"),
        Check(
            "each poison kind got its code",
            poison_kinds.isdisjoint(kinds_with_wrong),
            f"{len(poison_kinds - kinds_with_wrong)}/{len(poison_kinds)} kinds right",
        ),
        Check(
            "awkward and near-limit images captioned",
            m.captioned_awkward == awkward,
            ", ".join(sorted(m.captioned_awkward)),
        ),
        Check(
            "null-valued headers dropped, the others copied",
            not header_problems,
            "; ".join(header_problems[:5]) or f"{sum(c.expect_headers is not None for c in cases)} checked",
        ),
        Check(
            "no inference_failed / fetch_failed from injected faults",
            m.codes["inference_failed"] == 0 and m.codes["fetch_failed"] == 0,
            f"inference_failed={m.codes['inference_failed']} fetch_failed={m.codes['fetch_failed']}",
        ),
        Check(
            "duplicates within bound",
            m.duplicates <= bound,
            f"{m.duplicates} ≤ {bound} (max_in_flight {opts.max_in_flight} × {opts.consumers} consumers × "
            f"{max(1, redelivering)} consumer kills + broker restarts + drains)",
        ),
        Check("no secret in logs or outputs", not seen.leaks, "; ".join(seen.leaks[:5]) or f"{seen.scanned}"),
        Check(
            "worker memory bounded",
            0 < worker_peak_mb <= opts.max_worker_rss_mb,
            f"largest consumer worker peak {worker_peak_mb:.0f} MB ≤ {opts.max_worker_rss_mb} MB",
        ),
        Check("workers survived every fault", not state.exits, "; ".join(state.exits) or "no unexpected exit"),
        Check(
            "slow faults took effect",
            not felt_problems,
            "; ".join(felt_problems) or "hangs → call timeouts, bursts → 503s, drips → deadline retries",
        ),
        Check(
            "faults injected as asked",
            all(state.faults[kind] == n for kind, n in asked.items()),
            ", ".join(f"{state.faults[kind]}/{n} {kind}" for kind, n in asked.items()),
        ),
    ]
    settings = state.settings
    return ChaosReport(
        command=state.command,
        seed=opts.seed,
        requests=len(cases),
        requests_by_kind=dict(sorted(Counter(c.kind for c in cases).items())),
        faults=faults,
        settings_raised={
            "worker.inference_retry_budget_s": settings.worker.inference_retry_budget_s,
            "s3.retry_budget_s": settings.s3.retry_budget_s,
            "s3.fetch_deadline_s": settings.s3.fetch_deadline_s,
            "replicas.call_timeout_s": settings.replicas.call_timeout_s,
            "worker.max_in_flight": settings.worker.max_in_flight,
            "kafka.commit_interval_s": settings.kafka.commit_interval_s,
            "worker_window_peaks": [s.get("window_peak") for s in seen.worker_stats if s],
        },
        results=m.codes[RESULT],
        dead_letters_by_code=dict(sorted((k, v) for k, v in m.codes.items() if k != RESULT)),
        outcomes=sum(m.codes.values()),
        lost=len(m.lost),
        duplicates=m.duplicates,
        duplicate_bound=bound,
        unknown_outcomes=len(m.unknown),
        wrong_codes=m.wrong[:50],
        inference_retries=int(sum(w.get(RETRIES_SAMPLE, 0) for w in seen.worker_metrics.values())),
        retries_by_fault=retries_by_fault(seen.worker_metrics),
        worker_metrics=seen.worker_metrics,
        peak_rss_mb=seen.peak_rss_mb,
        secrets_scanned=seen.scanned,
        secret_leaks=seen.leaks[:50],
        worker_exits=state.exits,
        wall_time_s=round(seen.wall_time_s, 1),
        checks=checks,
    )


def _unfelt_faults(faults: dict[str, Any], retries: dict[str, dict[str, int]]) -> list[str]:
    """Slow faults that were injected but left no trace where they must (a fault that does not
    bite proves nothing)."""
    problems = []
    if faults.get("replica_hangs") and not retries["replica kills + hung replicas"]["replica call timeouts"]:
        problems.append("replicas hung but no call timed out")
    if faults.get("throttle_bursts") and not faults.get("s3_throttled"):
        problems.append("a throttling burst answered no call")
    if faults.get("s3_dripped") and not retries["s3 dripping GETs"]["fetch retries, deadline"]:
        problems.append(f"{faults['s3_dripped']} GET(s) dripped but no fetch hit its deadline")
    return problems


def _header_problems(cases: list[Case], headers: dict[bytes, list[list[tuple[str, bytes]]]]) -> list[str]:
    """Cases whose outcomes must carry given headers (a null-valued one dropped) and do not."""
    problems = []
    for case in cases:
        if case.expect_headers is None:
            continue
        want = list(case.expect_headers)
        got = headers.get(case.key, [])
        if not got or any(h != want for h in got):
            problems.append(f"{case.kind} {case.id}: headers {got[:2]}, expected {want}")
    return problems


def _lost_summary(lost: list[Case]) -> str:
    return f"kinds {dict(Counter(c.kind for c in lost).most_common(5))}; ids {[c.id for c in lost[:5]]}"


def _message(outcome: Outcome) -> str:
    error = outcome.body.get("error") or {}
    return str(error.get("message", ""))[:160]


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
        ("inference retries", f"{report.inference_retries} (captioner_inference_retries_total, all workers)"),
        (
            "retries by fault",
            "; ".join(
                f"{fault}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
                for fault, counts in report.retries_by_fault.items()
            ),
        ),
        (
            "worker counters",
            "; ".join(
                f"{name}: "
                + ", ".join(f"{k.removeprefix('captioner_').removesuffix('_total')}={v:g}" for k, v in c.items())
                for name, c in report.worker_metrics.items()
            ),
        ),
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
