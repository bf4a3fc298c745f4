"""The gRPC Trainer servicer: admin check, protobuf <-> domain objects, nothing else (TGI's rule).

Every RPC needs the admin token (auth.Authenticator.require_admin): without one the caller
gets UNAUTHENTICATED, with a caller's API key PERMISSION_DENIED. Control semantics live in
loop.Trainer (pause, resume) and promotion.Promoter (promote, rollback); their FlywheelErrors
become FAILED_PRECONDITION / NOT_FOUND through the server's ErrorInterceptor.
"""

from __future__ import annotations

from typing import Any

import grpc

from flywheel.core import errors
from flywheel.core.auth import Authenticator
from flywheel.core.modelstore import Manifest
from flywheel.core.server import run_blocking
from flywheel.trainer.loop import Trainer
from flywheel.v1 import trainer_pb2, trainer_pb2_grpc


def version_info(m: Manifest) -> trainer_pb2.VersionInfo:
    info = trainer_pb2.VersionInfo(
        version=m.version, parent=m.parent or 0, promoted=m.promoted, gate=m.gate, metrics=m.metrics
    )
    info.created_at.FromNanoseconds(int(m.created_at * 1e9))
    return info


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """flywheel.v1.Trainer over a loop.Trainer."""

    def __init__(self, trainer: Trainer, auth: Authenticator) -> None:
        self.trainer, self.auth = trainer, auth

    def _status(self) -> trainer_pb2.TrainerStatus:
        t = self.trainer
        return trainer_pb2.TrainerStatus(
            state=t.status if t.status != "training" or not t.paused else "paused",
            step=t.step,
            serving_version=t.serving_version,
            training_version=t.version,
            metrics={k: float(v) for k, v in t.metrics.items()},
            consumer_lag=t.last_lag,
            waiting_for=t.waiting_for,
            failing_steps=t.failing_steps,
            last_error=t.last_error,
        )

    @staticmethod
    def _version(v: int) -> int:
        if v < 0:
            raise errors.InvalidArgument(f"version {v}: use a version number >= 0 (see ListVersions)")
        return v

    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        self.auth.require_admin(context.invocation_metadata())
        return self._status()

    async def Pause(self, request: trainer_pb2.PauseRequest, context: grpc.aio.ServicerContext) -> Any:
        self.auth.require_admin(context.invocation_metadata())
        await run_blocking(self.trainer.pause, request.reason)
        return self._status()

    async def Resume(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.TrainerStatus:
        self.auth.require_admin(context.invocation_metadata())
        await run_blocking(self.trainer.resume)
        return self._status()

    async def Promote(self, request: trainer_pb2.PromoteRequest, context: grpc.aio.ServicerContext) -> Any:
        self.auth.require_admin(context.invocation_metadata())
        await run_blocking(self.trainer.promote, self._version(request.version), request.reason)
        return self._status()

    async def Rollback(self, request: trainer_pb2.RollbackRequest, context: grpc.aio.ServicerContext) -> Any:
        self.auth.require_admin(context.invocation_metadata())
        await run_blocking(self.trainer.rollback, self._version(request.version), request.reason)
        return self._status()

    async def ListVersions(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.ListVersionsResponse:
        self.auth.require_admin(context.invocation_metadata())
        manifests = await run_blocking(self.trainer.versions)
        return trainer_pb2.ListVersionsResponse(versions=[version_info(m) for m in manifests])
