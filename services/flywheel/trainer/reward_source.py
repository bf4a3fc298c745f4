"""Where the trainer's rewards come from: the RewardSource protocol, the Reward service client,
scoring that one bad sample cannot fail, and whether a reward version is worth training against.

Kept apart from rollout.py: generating a rollout needs only the policy; scoring it is a call to
another service (or, in tests, any object with a `score` method).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from flywheel.trainer.config import TrainerConfig

from flywheel.core import errors


class RewardSource(Protocol):
    """Anything that scores (prompt, response) pairs; higher is better."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


class RewardInfo(NamedTuple):
    version: int
    score_mean: float
    score_std: float
    heldout_accuracy: float = -1.0  # of this version on the held-out pairs; -1: not measured
    pairs_trained: int = 0
    pairs_heldout: int = 0
    online_accuracy: float = -1.0  # on the latest new pairs, each scored before it was trained on
    online_pairs: int = 0

    def unseen_accuracy(self) -> tuple[float, int]:
        """(accuracy, pairs) on pairs the model had not trained on when it scored them: the
        held-out split and the online window pooled (-1.0, 0 when neither was measured)."""
        parts = [
            (acc, n)
            for acc, n in ((self.heldout_accuracy, self.pairs_heldout), (self.online_accuracy, self.online_pairs))
            if acc >= 0 and n > 0
        ]
        n = sum(k for _, k in parts)
        return (sum(acc * k for acc, k in parts) / n, n) if n else (-1.0, 0)


def score_each(reward: RewardSource, prompts: list[str], responses: list[str]) -> list[float]:
    """Scores, NaN for a response with no text (never sent: the reward service refuses it) and for an
    item the service refuses. A refused batch is scored item by item, so one bad sample costs only
    itself."""
    out = [math.nan] * len(prompts)
    keep = [i for i, r in enumerate(responses) if r.strip()]
    if not keep:
        return out
    try:
        scores = reward.score([prompts[i] for i in keep], [responses[i] for i in keep])
    except errors.InvalidArgument:
        scores = []
        for i in keep:
            try:
                scores.extend(reward.score([prompts[i]], [responses[i]]))
            except errors.InvalidArgument:
                scores.append(math.nan)
    for i, x in zip(keep, scores, strict=True):
        out[i] = x
    return out


def not_ready(info: RewardInfo | None, cfg: TrainerConfig, training: bool = False) -> str:
    """Why the reward version in `info` is not worth training against ("" when it is). Once
    `training`, a dip to reward_keep_accuracy is tolerated: the held-out set grows and shifts with
    the policy, and its accuracy moves with it."""
    if info is None:
        return "the reward service does not answer GetInfo"
    v = f"reward v{info.version}"
    if info.pairs_trained < cfg.reward_min_pairs:
        return f"{v} was trained on {info.pairs_trained} pairs; training starts at {cfg.reward_min_pairs}"
    accuracy, measured_on = info.unseen_accuracy()
    if measured_on < cfg.reward_min_unseen_pairs:
        return (
            f"{v} was measured on {measured_on} unseen pairs (held-out and online); "
            f"training starts at {cfg.reward_min_unseen_pairs}"
        )
    least = min(cfg.reward_keep_accuracy, cfg.reward_min_accuracy) if training else cfg.reward_min_accuracy
    if least > 0 and accuracy < least:
        return (
            f"{v} accuracy on {measured_on} unseen pairs is {accuracy:.2f}; "
            f"training {'goes on' if training else 'starts'} at {least:.2f}"
        )
    return ""


class GrpcReward:
    """RewardSource over the Reward service (ScoreBatch; GetInfo for normalization statistics).

    `token` (auth.service_token) goes with every call as `authorization: Bearer`: with it the
    trainer's scores are the ones the reward service's normalization statistics count."""

    def __init__(self, address: str, timeout_s: float = 30.0, token: str = "") -> None:
        from flywheel.core.tls import channel
        from flywheel.v1 import reward_pb2_grpc

        self.address, self.timeout_s = address, timeout_s
        self._channel = channel(address)  # TLS when the tls section has a ca_file
        self._stub = reward_pb2_grpc.RewardStub(self._channel)
        self.version = -1
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, method: Any, request: Any) -> Any:
        import grpc

        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # this request, not the service: see score_each
                raise errors.InvalidArgument(f"reward service at {self.address}: {e.details()}") from e
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
        return RewardInfo(
            r.reward_version,
            r.score_mean,
            r.score_std,
            r.heldout_accuracy,
            r.pairs_trained,
            r.pairs_heldout,
            r.online_accuracy,
            r.online_pairs,
        )

    def close(self) -> None:
        self._channel.close()
