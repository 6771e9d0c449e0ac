"""Tooling around the runtime, never part of it: benchmarks (`bench`) and the fault-injection run
(`chaos`). The runtime (`workers`, `deployment`) never imports this package; `workers/cli.py`
reaches it lazily from the `bench` and `chaos` commands."""
