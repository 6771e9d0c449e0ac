"""`captioner chaos`: a bounded, loopback-only fault-injection run that proves nothing is lost.

One process tree, everything embedded: SeaweedFS (S3) and a Tansu broker with durable `s3://`
storage on it; Ray with two tiny-random replicas under an app name unique to the run; a fault
proxy in front of S3; consumer workers as child processes, each a real Pipeline in one group.
A feeder streams poison (hostile records among it), awkward, near-limit and valid requests while
replicas are killed and hung, consumers killed and drained mid-rebalance, the broker restarted and
S3 throttled, dripped and cut; afterwards every request must have a result or a dead letter with the expected
code, duplicates must stay within the in-flight window per redelivering fault, no secret may
appear in any log line or output, and worker memory must stay bounded. docs/reliability.md.

Modules by concern: `options` (what to do, the workers' settings), `corpus` (the request mix),
`hostile` (hostile records, near-limit images), `proxy` (S3 faults), `faults` (replica kills and
hangs, broker restarts, when), `consumers` (the worker
processes and their metrics dumps), `stream` (feeder, progress, outcome collector), `observe`
(memory, log scan), `state` (the one run-state object), `run` (the phases), `report` (checks,
evaluation, output).
"""

from harness.chaos.corpus import Case, Corpus, build_corpus
from harness.chaos.options import ChaosOptions
from harness.chaos.report import (
    ChaosReport,
    Check,
    command_line,
    print_report,
    write_report,
)
from harness.chaos.run import run_chaos
from workers.outcomes import RESULT

__all__ = [
    "RESULT",
    "Case",
    "ChaosOptions",
    "ChaosReport",
    "Check",
    "Corpus",
    "build_corpus",
    "command_line",
    "print_report",
    "run_chaos",
    "write_report",
]
