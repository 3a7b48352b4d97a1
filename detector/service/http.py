"""HTTP endpoints on the service's own loop: ``/metrics``, ``/healthz``, ``/readyz`` (SPEC §9)."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import Metrics


class Probed(Protocol):
    metrics: Metrics

    def healthy(self) -> bool: ...

    def ready(self) -> bool: ...


class HttpServer:
    def __init__(self, service: Probed, host: str, port: int) -> None:
        self.service = service
        self.host = host
        self.port = port
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # an ephemeral port was asked for: report the real one
            server = site._server
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.service.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        ok = self.service.healthy()
        return web.json_response({"status": "ok" if ok else "unhealthy"}, status=200 if ok else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        ok = self.service.ready()
        return web.json_response({"status": "ready" if ok else "not ready"}, status=200 if ok else 503)
