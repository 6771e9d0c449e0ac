"""Prometheus metrics of the worker (definitions only) and the /metrics endpoint.

Labels are bounded sets (stage names, error codes, topics): never ids, URIs or anything a
request controls, so cardinality stays flat and nothing secret can reach a label.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

CONSUMED = Counter("captioner_consumed_total", "Kafka records handed to the pipeline", ["topic"])
RESULTS = Counter("captioner_results_total", "Results acknowledged by the broker", ["topic"])
DEAD_LETTERS = Counter("captioner_dead_letters_total", "Dead letters acknowledged by the broker", ["code"])
IN_FLIGHT = Gauge("captioner_in_flight", "Records consumed but not yet acknowledged downstream")
PAUSED = Gauge("captioner_source_paused", "1 while the source is paused by backpressure")
BATCH_SIZE = Histogram(
    "captioner_batch_size",
    "Images per generate call, as reported by the replicas",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
STAGE_LATENCY = Histogram("captioner_stage_seconds", "Time spent per stage", ["stage"], buckets=_LATENCY_BUCKETS)
CACHE_HITS = Counter("captioner_cache_hits_total", "Captions answered from the cache")
CACHE_MISSES = Counter("captioner_cache_misses_total", "Cache lookups that went to the model")
COMMITS = Counter("captioner_commits_total", "Offset commits sent", ["result"])
REBALANCES = Counter("captioner_rebalances_total", "Partitions assigned or revoked", ["event"])
PRODUCE_ERRORS = Counter(
    "captioner_produce_errors_total",
    "Outcomes the broker did not acknowledge: 'record' (this record can never be written as it is: "
    "replaced by a compact dead letter) or 'transport' (re-sent with backoff)",
    ["kind"],
)
COMPACT_DEAD_LETTERS = Counter(
    "captioner_compact_dead_letters_total",
    "Outcomes that could not be encoded or produced, replaced by a compact dead letter",
    ["reason"],
)
INFERENCE_RETRIES = Counter("captioner_inference_retries_total", "Replica calls retried")
REPLICA_CALL_TIMEOUTS = Counter(
    "captioner_replica_call_timeouts_total", "Replica calls cancelled at replicas.call_timeout_s"
)
FETCH_RETRIES = Counter("captioner_fetch_retries_total", "S3 fetch attempts retried", ["kind"])
OFFSET_RESETS = Counter(
    "captioner_offset_resets_total", "Partitions whose offsets moved backwards (reset, truncation)", ["topic"]
)
# Per assigned partition: the newest offset minus the group's committed offset, as KEDA's Kafka
# scaler and `captioner lag` count it (workers/ops/lag.py). Partitions are bounded by the topic.
CONSUMER_LAG = Gauge(
    "captioner_consumer_lag", "Records on an assigned partition not yet committed", ["topic", "partition"]
)
# Set on every turn of a source's poll loop: a loop that died or hangs stops moving it (alerted on).
LAST_POLL = Gauge(
    "captioner_source_last_poll_timestamp_seconds", "Unix time a source's poll() last returned", ["source"]
)
MEMORY_BUDGET_IN_USE = Gauge(
    "captioner_memory_budget_bytes_in_use", "Bytes of images being decoded, held from the memory budget"
)
HTTP_REJECTED = Counter("captioner_http_rejected_total", "HTTP requests refused before any work", ["reason"])
ENGINE_FALLBACKS = Counter(
    "captioner_engine_fallbacks_total",
    "Images the decoding engine handed to transformers' generate, by why (sampling, max_output_length, model)",
    ["reason"],
)

_server_lock = threading.Lock()
_server_port: int | None = None


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Start the /metrics endpoint once per process; port 0 disables it."""
    global _server_port
    if port == 0:
        return None
    with _server_lock:
        if _server_port is None:
            try:
                start_http_server(port, addr=host)
            except OSError as e:
                # Another process on this node (a second Serve replica) already serves it.
                log.warning("metrics port %s:%d unavailable (%s); not serving /metrics here", host, port, e)
                return None
            _server_port = port
            log.info("metrics on http://%s:%d/metrics", host, port)
        return _server_port
