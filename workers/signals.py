"""How the local commands (`run`, `serve`, `demo`) stop on SIGTERM and SIGINT: exit 0, nothing left.

Two phases:
- while starting (embedded servers, Ray, the model loading) a signal raises `Stopped` in the
  main thread (`raise_on_stop_signals`), which unwinds every context manager on the way: Serve
  and Ray shut down, the embedded servers stop, their temp folders go; the command exits 0;
- once running, a signal only flags (`on_stop_signals`): the main thread's wait returns and the
  command stops in order (stop taking work, drain, commit, then replicas, Ray, servers).

`ray.init` installs its own SIGTERM handler (`sys.exit(15)` from wherever the main thread is,
with a stack dump where that lands in Ray's code); `keep_stop_handlers` puts ours back after it
and turns a SIGTERM that Ray's handler caught during `ray.init` into `Stopped`.
What a signal cannot reach (SIGKILL) is covered by the servers' parent-death signal
(`workers/embedded/lifetime.py`) and Ray's own fate sharing: docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived before the command could drain: unwind and exit 0.

    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it.
    """


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_on_stop_signals() -> None:
    """The starting phase: the first SIGTERM/SIGINT raises `Stopped`; later ones are ignored so
    they cannot interrupt the cleanup the first one started."""

    def handler(signum: int, _frame: object) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, lambda *_: log.info("already stopping"))
        raise Stopped(signal.Signals(signum).name)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def on_stop_signals(request_stop: Callable[[], object]) -> None:
    """The running phase: SIGTERM and SIGINT call `request_stop`, which must only flag."""
    for s in STOP_SIGNALS:
        signal.signal(s, lambda *_: request_stop())


@contextlib.contextmanager
def keep_stop_handlers() -> Iterator[None]:
    """Restore the SIGTERM/SIGINT handlers that were in place before the block (around `ray.init`)."""
    if not _in_main_thread():  # handlers can only be set from the main thread; Ray skips it too
        yield
        return
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        yield
    except SystemExit as e:
        # Ray's handler ran (a SIGTERM inside the block): where the command handles SIGTERM
        # itself, that is the command's stop, not an exit code 15.
        if e.code == signal.SIGTERM and callable(saved[signal.SIGTERM]):
            raise Stopped(signal.SIGTERM.name) from None
        raise
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)
