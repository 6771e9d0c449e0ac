"""`python -m harness.chaos consumer-worker ...`: the child process a chaos run starts per consumer."""

import sys

from harness.chaos.consumers import consumer_worker_main

if len(sys.argv) > 1 and sys.argv[1] == "consumer-worker":
    raise SystemExit(consumer_worker_main(sys.argv[2:]))
raise SystemExit("usage: python -m harness.chaos consumer-worker ... (the chaos run itself is `captioner chaos`)")
