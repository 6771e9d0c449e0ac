"""Logging for the commands: plain text or one JSON object per line, and Ray kept out of the way.

`configure_logging` is called once per process by the CLI. `--log-format json` (or
CAPTIONER_LOG_FORMAT=json) makes every record one JSON object (python-json-logger) with
`time`, `level`, `logger`, `message` and, where the call site knows them, `request_id`,
`topic`, `partition`, `offset` (pass `extra=log_fields(...)`).

Ray and Serve log through their own handlers (`ray`, `ray.serve`, no propagation), and Ray's
driver prints raylet error messages straight to `sys.stdout` from a background thread (that is
where "The actor is dead because it was killed by `ray.kill`" after `serve.shutdown()` comes
from). `ray_output_as_logs` turns both into records of our own handler: shown at INFO with
`--verbose`, else only their warnings and errors, so a command's table on stdout stays clean.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# Third-party loggers that are chatty at INFO: shown only with --verbose.
_QUIET_UNLESS_VERBOSE = ("ray", "kafka", "botocore", "urllib3", "transformers", "filelock")
# Logger that Ray's driver-side prints are re-emitted on.
RAY_OUTPUT_LOGGER = "ray.driver_output"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FIELDS = ("request_id", "topic", "partition", "offset")

_handler: logging.Handler | None = None


def log_fields(
    *, request_id: str | None = None, topic: str | None = None, partition: int | None = None, offset: int | None = None
) -> dict[str, Any]:
    """`extra=` for a log call about one request: the fields a JSON line carries (unknown ones left out)."""
    values = {"request_id": request_id, "topic": topic, "partition": partition, "offset": offset}
    return {k: v for k, v in values.items() if v is not None}


def make_formatter(fmt: LogFormat) -> logging.Formatter:
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            json_ensure_ascii=False,
        )
    return logging.Formatter(_TEXT_FORMAT)


class _Levels(logging.Filter):
    """What our handler shows. A filter on the handler rather than logger levels, so nothing
    global changes (`ray.init` resets the `ray` logger's level anyway): chatty third-party
    records only at WARNING and above unless verbose (INFO then); ours at INFO (WARNING when
    `quiet`, DEBUG when verbose)."""

    def __init__(self, *, verbose: bool, quiet: bool):
        super().__init__()
        self.third_party = logging.INFO if verbose else logging.WARNING
        self.ours = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == n or record.name.startswith(n + ".") for n in _QUIET_UNLESS_VERBOSE):
            return record.levelno >= self.third_party
        return record.levelno >= self.ours


def configure_logging(
    fmt: LogFormat = "text", *, verbose: bool = False, quiet: bool = False, stream: Any = None
) -> logging.Handler:
    """One stderr handler on the root logger (see _Levels for what it shows; `quiet` is for
    commands whose output is a table). A second call replaces it; `unconfigure_logging` removes it."""
    global _handler
    unconfigure_logging()
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(make_formatter(fmt))
    _handler.addFilter(_Levels(verbose=verbose, quiet=quiet))
    root = logging.getLogger()
    root.addHandler(_handler)
    # Records below the root's level are never made; the handler's filter does the choosing.
    # Only ours go down to DEBUG (the clients' DEBUG records are costly to make).
    root.setLevel(logging.INFO)
    if verbose:
        logging.getLogger("workers").setLevel(logging.DEBUG)
    adopt_ray_loggers()
    return _handler


def unconfigure_logging() -> None:
    """Remove our handler (for tests and embedding callers)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None


def adopt_ray_loggers() -> None:
    """Route the `ray` and `ray.serve` loggers through our handler (their own stderr handlers
    are removed), so they share the format and the --verbose rule. Ray installs those handlers
    when imported: a no-op for a module not imported yet, so call it again after importing."""
    if _handler is None:
        return
    for name in ("ray", "ray.serve"):
        if name not in sys.modules:
            continue
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True


class _LinesToLog(io.TextIOBase):
    """A text stream whose complete lines become log records (for code that print()s)."""

    def __init__(self, logger: logging.Logger, level: int):
        self._logger = logger
        self._level = level
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.log(self._level, line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._partial.strip():
            self._logger.log(self._level, self._partial.rstrip())
        self._partial = ""


@contextlib.contextmanager
def ray_output_as_logs() -> Iterator[None]:
    """While Ray runs in this process: what Ray's threads print to stdout becomes INFO records of
    `ray.driver_output` (shown with --verbose), and Ray's loggers go through our handler.

    Wrap the whole Ray lifetime (start to `ray.shutdown()`, which joins Ray's printing threads)
    and print tables after it. Only sys.stdout is swapped: our own code writes tables through
    rich Consoles created after the block, and logs on stderr are untouched.
    """
    import ray  # their loggers exist once imported
    import ray.serve  # noqa: F401

    adopt_ray_loggers()
    sink = _LinesToLog(logging.getLogger(RAY_OUTPUT_LOGGER), logging.INFO)
    with contextlib.redirect_stdout(sink):
        try:
            yield
        finally:
            sink.flush()
