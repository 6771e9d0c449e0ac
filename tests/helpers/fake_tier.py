"""A stand-in inference tier for transport-failure tests: the real batch protocol over real HTTP on
loopback (workers/replica_wire.py), with answers that need no model, and a switch that makes it
refuse connections, answer 503 (Serve's backpressure) or stall past the caller's timeout."""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

from aiohttp import web

from workers.replica_api import ReplicaAnswer, ReplicaInfo
from workers.replica_wire import (
    BATCH_PATH,
    INFO_PATH,
    decode_batch,
    encode_answers,
    encode_info,
)

Mode = Literal["ok", "busy", "stall", "down"]
SIZE = 32


class FakeTier:
    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.mode: Mode = "ok"
        self.calls = {"ok": 0, "busy": 0, "stall": 0}
        self.images_answered = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-tier", daemon=True)
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    def start(self) -> FakeTier:
        self._thread.start()
        self._call(self._listen())
        return self

    def set_mode(self, mode: Mode) -> None:
        """`down` closes the listening socket (connection refused); any other mode listens."""
        if mode == "down" and self._runner is not None:
            self._call(self._close())
        elif mode != "down" and self._runner is None:
            self._call(self._listen())
        if mode != "stall":
            self._loop.call_soon_threadsafe(self._release.set)
        self.mode = mode

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._release.set)
        if self._runner is not None:
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(BATCH_PATH, self._batch)
        app.router.add_get(INFO_PATH, self._info)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        self._runner = None

    async def _info(self, _request: web.Request) -> web.Response:
        info = ReplicaInfo(
            model={"name": "fake-tier", "backend": "none", "untrained": True},
            height=SIZE,
            width=SIZE,
            resample=2,
            device="cpu",
        )
        return web.json_response(encode_info(info))

    async def _batch(self, request: web.Request) -> web.Response:
        items = decode_batch(await request.read())
        mode = self.mode
        if mode == "busy":
            self.calls["busy"] += 1
            return web.json_response({"error": {"code": "unavailable"}}, status=503)
        if mode == "stall":
            self.calls["stall"] += 1
            self._release.clear()
            await self._release.wait()  # held until the mode changes; the caller times out first
            return web.json_response({"error": {"code": "unavailable"}}, status=503)
        self.calls["ok"] += 1
        self.images_answered += len(items)
        answers = [ReplicaAnswer([f"fake {p.shape[0]}x{p.shape[1]}"], None, len(items), 1.0) for p, _ in items]
        return web.json_response(encode_answers(answers))
