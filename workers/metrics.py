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
    "captioner_batch_size", "Images per generate call, as reported by the replicas",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
STAGE_LATENCY = Histogram(
    "captioner_stage_seconds", "Time spent per stage", ["stage"], buckets=_LATENCY_BUCKETS
)
CACHE_HITS = Counter("captioner_cache_hits_total", "Captions answered from the cache")
CACHE_MISSES = Counter("captioner_cache_misses_total", "Cache lookups that went to the model")
COMMITS = Counter("captioner_commits_total", "Offset commits sent", ["result"])
REBALANCES = Counter("captioner_rebalances_total", "Partitions assigned or revoked", ["event"])
PRODUCE_ERRORS = Counter("captioner_produce_errors_total", "Records the broker did not acknowledge")
INFERENCE_RETRIES = Counter("captioner_inference_retries_total", "Replica calls retried")
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
