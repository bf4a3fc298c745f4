"""The reward model: a scalar-head `AutoModelForSequenceClassification` over (prompt, response).

What is read: the model's single logit. For decoder models (GPT-2, Llama, Qwen, ...) the HF
class reads it at the last non-pad token of each row, so `pad_token_id` must be set (we set
it to EOS when the tokenizer has none). For BERT-style encoders (the MiniLM starter) the HF
class reads the pooled [CLS] vector (tanh pooler over the first token's final state); the
encoder is bidirectional, so that vector has seen every token of the prompt and the response.

Losses are pure functions: Bradley-Terry on pairs with an optional margin (Llama 2's rating
margin, arXiv 2307.09288 sec. 3.2.2) and a binary loss on pointwise thumbs/ratings, treating
them as desirable/undesirable the way KTO does (arXiv 2402.01306).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from prometheus_client import Counter, Gauge, Histogram
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core import errors
from flywheel.core.metrics import LATENCY_BUCKETS
from flywheel.core.modelstore import save_pretrained
from flywheel.v1 import events_pb2

log = logging.getLogger(__name__)

SWAPS = Counter("flywheel_reward_swaps", "Reward-model hot swaps by outcome (ok, refused).", ["outcome"])
VERSION = Gauge("flywheel_reward_serving_version", "Reward-model version being served.")
SCORE_LATENCY = Histogram(
    "flywheel_reward_score_seconds", "Model time of one scoring call (all its chunks).", buckets=LATENCY_BUCKETS
)
SCORED = Counter("flywheel_reward_scored_items", "(prompt, response) items scored.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------- losses


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    weight: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean of -log sigmoid(r_c - r_r - margin). All inputs (B,); returns a scalar."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)  # (B,)
    losses = -F.logsigmoid(diff)  # (B,)
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp_min(1e-8)


def binary_loss(r: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of sigmoid(r) against a 0..1 label (thumbs up=1, down=0; normalized rating). (B,) -> scalar."""
    losses = F.binary_cross_entropy_with_logits(r, label, reduction="none")  # (B,)
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp_min(1e-8)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen answer scores strictly higher. (B,), (B,) -> float."""
    if r_chosen.numel() == 0:
        return float("nan")
    return (r_chosen > r_rejected).float().mean().item()


# ---------------------------------------------------------------------------- the model


class Stopped(Exception):
    """A long scoring pass was cut short because its caller is shutting down."""


class RewardModel:
    """A sequence-classification model with one output plus its tokenizer."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 256,
        device: str | torch.device = "cpu",
    ) -> None:
        if model.config.num_labels != 1:
            raise errors.FailedPrecondition(f"a reward model needs num_labels=1, got {model.config.num_labels}")
        if tokenizer.pad_token is None:  # decoder tokenizers: pad with EOS, read at the last non-pad token
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.device = torch.device(device)
        # transformers declares PreTrainedModel.to with @wraps(nn.Module.to), which mypy reads as
        # a function whose first argument is the model: the library's annotation is wrong, not the call.
        self.model: PreTrainedModel = model.to(self.device)  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)

    @classmethod
    def load(cls, path: str | os.PathLike, max_length: int = 256, device: str = "cpu") -> RewardModel:
        """from_pretrained of a local dir or HF name (a model with another head gets a fresh scalar one)."""
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
        return cls(model, tok, max_length, resolve_device(device))

    def save(self, path: str | os.PathLike) -> None:
        save_pretrained(self.model, self.tokenizer, path)

    def forward(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Scores with grad. Returns (B,)."""
        enc = self.tokenizer(
            list(prompts),
            list(responses),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        ).to(self.device)  # input_ids (B, T)
        return self.model(**enc).logits[:, 0].float()  # (B, 1) -> (B,)

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        chunk_size: int = 64,
        stop: threading.Event | None = None,
    ) -> list[float]:
        """Scores without grad, in chunks, in eval mode; raises Stopped between chunks once `stop` is set."""
        was_training = self.model.training
        self.model.eval()
        out: list[float] = []
        try:
            for i in range(0, len(prompts), chunk_size):
                if stop is not None and stop.is_set():
                    raise Stopped(f"scoring stopped after {i} of {len(prompts)} items")
                out += self.forward(prompts[i : i + chunk_size], responses[i : i + chunk_size]).tolist()
        finally:
            self.model.train(was_training)
        return out


_LAYER = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")  # BERT, Llama/Qwen, GPT-2, T5 stacks


def train_only_top_layers(model: PreTrainedModel, n: int) -> list[torch.nn.Parameter]:
    """Freeze the embeddings and every transformer layer but the top `n` (0: train everything);
    returns the parameters left to train. A pretrained encoder's lower layers already carry what
    the head needs: training the top two of MiniLM's six costs half as much per step on a CPU and
    learned the panel's preferences as fast per step in the same run (docs/bench/learning.md)."""
    depth = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if n <= 0 or depth <= n:
        return [p for p in model.parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        layer = _LAYER.search(name)
        if (layer is not None and int(layer.group(1)) < depth - n) or (layer is None and "embed" in name):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def train_step(
    rm: RewardModel,
    optimizer: torch.optim.Optimizer,
    pairs: Sequence,  # objects with prompt, chosen, rejected, weight, margin
    labels: Sequence = (),  # objects with prompt, response, label
    binary_weight: float = 0.0,
    max_grad_norm: float = 1.0,
    fresh: int = 0,
) -> dict[str, float]:
    """One AdamW step on BT(pairs) + binary_weight * BCE(labels); returns loss and batch accuracy.

    The first `fresh` pairs are ones the model has never trained on: their accuracy, scored in this
    step's forward before the update, is progressive validation for free ("fresh_correct" of
    "fresh_n", ties left out; Blum, Kalai & Langford 1999)."""
    rm.model.train()
    b = len(pairs)
    prompts = [p.prompt for p in pairs] * 2 + [x.prompt for x in labels]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs] + [x.response for x in labels]
    r = rm.forward(prompts, responses)  # (2B + L,) one forward for chosen, rejected and labels
    r_c, r_r, r_l = r[:b], r[b : 2 * b], r[2 * b :]
    w = torch.tensor([p.weight for p in pairs], dtype=torch.float32, device=r.device)
    m = torch.tensor([p.margin for p in pairs], dtype=torch.float32, device=r.device)
    loss = bradley_terry_loss(r_c, r_r, w, m)
    bce = torch.zeros((), device=r.device)
    if labels and binary_weight > 0:
        y = torch.tensor([x.label for x in labels], dtype=torch.float32, device=r.device)
        bce = binary_loss(r_l, y)
        loss = loss + binary_weight * bce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in rm.model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    won = (r_c.detach() > r_r.detach())[:fresh].tolist()
    scored = [w for w, p in zip(won, pairs[:fresh], strict=True) if getattr(p, "source", "") != "tie"]
    return {
        "loss": loss.item(),
        "bce": bce.item(),
        "batch_accuracy": pairwise_accuracy(r_c.detach(), r_r.detach()),
        "fresh_correct": float(sum(scored)),
        "fresh_n": float(len(scored)),
    }


def evaluate(
    rm: RewardModel, pairs: Sequence, chunk_size: int = 64, stop: threading.Event | None = None
) -> dict[str, float]:
    """Held-out pairwise accuracy and the mean/std of the scores (ties are left out); see score for `stop`."""
    pairs = [p for p in pairs if getattr(p, "source", "") != "tie"]
    if not pairs:
        return {"heldout_accuracy": -1.0}
    prompts = [p.prompt for p in pairs]
    rc = torch.tensor(rm.score(prompts, [p.chosen for p in pairs], chunk_size, stop))  # (B,)
    rr = torch.tensor(rm.score(prompts, [p.rejected for p in pairs], chunk_size, stop))  # (B,)
    both = torch.cat([rc, rr])
    return {
        "heldout_accuracy": pairwise_accuracy(rc, rr),
        "score_mean": both.mean().item(),
        "score_std": both.std().item() if both.numel() > 1 else 1.0,
    }


# ---------------------------------------------------------------------------- hot-swapped scorer


@dataclasses.dataclass
class _Loaded:
    rm: RewardModel
    version: int
    path: str
    metrics: dict[str, float]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class Scorer:
    """Scores with one verified version at a time; a new version is loaded aside, then swapped in.

    `score()` takes a reference to the current version once, so a whole batch is scored by one
    version (reported back). A version that fails to load is refused (FailedPrecondition,
    metric) and the current one keeps scoring. Running score mean/std (Welford) restart at
    every swap, seeded from the version's held-out statistics; only calls made with
    `record_stats` (the trainer's own rollouts) count in them, so that nobody else's traffic
    shifts the scale the trainer normalizes its rewards with.
    """

    def __init__(self, max_length: int = 256, device: str = "cpu", chunk_size: int = 64) -> None:
        self.max_length, self.device, self.chunk_size = max_length, device, chunk_size
        self._current: _Loaded | None = None
        self._swap_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._n, self._mean, self._m2 = 0, 0.0, 0.0
        self.last_error = ""

    @property
    def version(self) -> int | None:
        cur = self._current
        return cur.version if cur else None

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def metrics(self) -> dict[str, float]:
        cur = self._current
        return dict(cur.metrics) if cur else {}

    def load(self, path: str | os.PathLike, version: int, metrics: dict[str, float] | None = None) -> bool:
        """Load `path` (already verified) as `version` and swap it in; False if it is already serving."""
        with self._swap_lock:
            cur = self._current
            if cur is not None and cur.version == version and cur.path == str(path):
                return False
            try:
                rm = RewardModel.load(path, self.max_length, self.device)
                rm.model.eval()
                rm.score(["probe"], ["probe"])  # a checkpoint that loads but cannot run is refused too
            except Exception as e:
                SWAPS.labels("refused").inc()
                self.last_error = f"version {version} from {path}: {type(e).__name__}: {e}"
                log.error("reward hot swap refused: %s", self.last_error)
                raise errors.FailedPrecondition(
                    f"could not load reward version {version} from {str(path)!r} ({type(e).__name__}: {e}); "
                    f"still scoring with version {cur.version if cur else None}"
                ) from e
            self._current = _Loaded(rm, version, str(path), dict(metrics or {}))  # the atomic swap
            with self._stats_lock:
                self._n, self._mean, self._m2 = 0, 0.0, 0.0
            SWAPS.labels("ok").inc()
            VERSION.set(version)
            self.last_error = ""
            log.info("scoring with reward version %d from %s", version, path)
            return True

    def apply_update(self, update: events_pb2.ModelUpdate, store) -> bool:  # store: ModelStore
        """Verify an announced version against its digests, then load it. Refusals are logged, not raised."""
        try:
            path = store.from_update(update)
            return self.load(path, update.version, dict(update.metrics))
        except errors.FlywheelError as e:
            if not isinstance(e, errors.FailedPrecondition):
                SWAPS.labels("refused").inc()
                self.last_error = f"version {update.version}: {e.message}"
            log.error("reward update %s v%d refused: %s", update.model, update.version, e.message)
            return False

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, record_stats: bool = False
    ) -> tuple[list[float], int]:
        """Scores of every item and the one version that produced them (blocking); `record_stats`:
        they count in the running mean/std (only for the trainer's calls)."""
        cur = self._current
        if cur is None:
            raise errors.Unavailable("the reward model is not loaded yet; retry shortly")
        t0 = time.perf_counter()
        with cur.lock:  # one batch at a time per model: CPU threads are shared anyway
            scores = cur.rm.score(prompts, responses, self.chunk_size)
        SCORE_LATENCY.observe(time.perf_counter() - t0)
        SCORED.inc(len(scores))
        if record_stats:
            self._record(scores, cur)
        return scores, cur.version

    def _record(self, scores: list[float], scored_by: _Loaded) -> None:
        with self._stats_lock:
            if self._current is not scored_by:  # a swap came in meanwhile: these belong to the old scale
                return
            for s in scores:
                self._n += 1
                d = s - self._mean
                self._mean += d / self._n
                self._m2 += d * (s - self._mean)

    def stats(self) -> tuple[float, float]:
        """(mean, std) of the trainer's scores by this version; the version's held-out figures until there
        are two of them."""
        with self._stats_lock:
            if self._n >= 2:
                return self._mean, math.sqrt(self._m2 / (self._n - 1))
        m = self.metrics
        return m.get("score_mean", 0.0), m.get("score_std", 1.0)
