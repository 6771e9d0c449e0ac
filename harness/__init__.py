"""Benchmarks and chaos runs: tools around the worker, not part of its runtime."""
