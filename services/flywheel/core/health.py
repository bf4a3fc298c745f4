"""grpc.health.v1 for Flywheel's servers (see HealthService for why it is our own)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1, whose Watch streams end (UNAVAILABLE) once shutdown has told them NOT_SERVING.

    grpc_health's aio servicer keeps every Watch open until the server cancels it, so each
    watcher (gRPC client-side health checking uses Watch) would hold a graceful stop for
    the whole grace period. Everything starts NOT_SERVING.

    Health is outside the server's limit on RPCs in flight (a loaded service still answers its
    probes), so open Watch streams have a bound of their own, `max_watches`: one more is
    RESOURCE_EXHAUSTED with a retry hint. Check is never refused.
    """

    def __init__(self, max_watches: int = 100) -> None:
        self.max_watches = max_watches
        self.watching = 0
        self._status: dict[str, int] = {"": _NOT_SERVING}
        self._version = 0  # bumped on every change, so a watcher never misses one
        self._changed = asyncio.Condition()
        self._shutting_down = False
        self._closed = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        status = self._status.get(request.service)
        if status is None:
            name = request.service if len(request.service) <= 100 else request.service[:100] + "..."
            known = ", ".join(repr(n) for n in sorted(self._status))
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {name!r}: the services are {known}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if self.watching >= self.max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watches} health Watch streams are open already (server.max_health_watches): "
                "use Check, or retry in 5 s",
                trailing_metadata=(("retry-after", "5"),),
            )
        self.watching += 1
        try:
            await self._watch(request, context)
        finally:
            self.watching -= 1

    async def _watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        last = None
        while True:
            seen = self._version
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._changed_since, seen))

    def _changed_since(self, version: int) -> bool:
        return self._version != version or self._closed

    def status(self, service: str = "") -> int | None:
        return self._status.get(service)

    async def set(self, service: str, status: int) -> None:
        """Set one service's status; ignored once shutdown began."""
        if not self._shutting_down:
            await self._update({service: status})

    async def enter_graceful_shutdown(self) -> None:
        """Everything NOT_SERVING, for good."""
        await self._update(dict.fromkeys(self._status, _NOT_SERVING))
        self._shutting_down = True

    async def close(self) -> None:
        """End every Watch stream (after they have seen NOT_SERVING)."""
        self._closed = True
        await self._update({})

    async def _update(self, changes: dict[str, int]) -> None:
        async with self._changed:
            self._status.update(changes)
            self._version += 1
            self._changed.notify_all()
