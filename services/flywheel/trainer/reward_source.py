"""Where the trainer's rewards come from: the RewardSource protocol and the Reward service client.

Kept apart from rollout.py: generating a rollout needs only the policy; scoring it is a call to
another service (or, in tests, any object with a `score` method).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from flywheel.core import errors


class RewardSource(Protocol):
    """Anything that scores (prompt, response) pairs; higher is better."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class RewardInfo(NamedTuple):
    version: int
    score_mean: float
    score_std: float


class GrpcReward:
    """RewardSource over the Reward service (ScoreBatch; GetInfo for normalization statistics)."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        import grpc

        from flywheel.v1 import reward_pb2_grpc

        self.address, self.timeout_s = address, timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = reward_pb2_grpc.RewardStub(self._channel)
        self.version = -1

    def _call(self, method: Any, request: Any) -> Any:
        import grpc

        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise errors.Unavailable(f"reward service at {self.address} failed: {e.code().name}: {e.details()}") from e

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from flywheel.v1 import reward_pb2

        items = [reward_pb2.ScoreRequest(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        resp = self._call(self._stub.ScoreBatch, reward_pb2.ScoreBatchRequest(items=items))
        if len(resp.scores) != len(items):
            raise errors.Unavailable(f"reward service returned {len(resp.scores)} scores for {len(items)} items")
        self.version = resp.reward_version
        return list(resp.scores)

    def info(self) -> RewardInfo | None:
        from flywheel.v1 import reward_pb2

        r = self._call(self._stub.GetInfo, reward_pb2.RewardInfoRequest())
        return RewardInfo(r.reward_version, r.score_mean, r.score_std)

    def close(self) -> None:
        self._channel.close()
