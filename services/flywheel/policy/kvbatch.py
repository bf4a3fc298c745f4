"""A loaded model version and the running batch of sequences decoded on it, with its KV cache.

The batch keeps one `DynamicCache` of shape (B, H, L, D) per layer for all its sequences,
left-padded to a common length L, with an attention mask (B, L) that is 1 on real tokens.
Position ids are the count of real tokens before each new one, so a padded row computes the
same values as the sequence would alone. The cache is re-shaped only when the batch changes:
`filter` drops rows (and trims columns that became all padding), `merge` left-pads two batches
to one length and stacks them (TGI's CausalLMBatch.filter / concatenate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from flywheel.core.masks import attention_mask_4d
from flywheel.policy.config import EngineConfig
from flywheel.policy.lora import LoraAdapter, rows_on
from flywheel.policy.mixed import routable_modules

if TYPE_CHECKING:
    from flywheel.policy.mixed import DrainForward
    from flywheel.policy.sequence import Sequence

_NO_ADAPTER = _NO_SPLIT = contextlib.nullcontext()
DEFAULT_CONTEXT = 4096
PREFILL_MASK_MAX = 1 << 22  # elements of a 4D prefill mask we build ourselves (16 MB in float32)


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """Weights, tokenizer and the model-store version they are. Immutable pairing: a sequence
    holds the LoadedModel it was admitted on, and its result reads the version from there."""

    source: str
    version: int
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    context: int
    eos_ids: frozenset[int]
    special_ids: frozenset[int]
    pad_id: int
    logits_to_keep: bool
    mask_4d: bool = False  # prefill and decode pass a ready 4D mask (checked equal to the 2D path at load)
    # Its weighted modules, where a forward shared with other weights of its architecture can route
    # them (`flywheel.policy.mixed`); None where it cannot. Checked at load.
    routable_modules: tuple[str, ...] | None = None
    row_weighted: tuple[str, ...] = ()  # of those, the norms that take a weight per row (`mixed.scales_rows`)
    # A LoRA adapter version: the base's module tree (shared with the LoadedModel of the base or of
    # another adapter on it) plus this adapter's deltas, added in each forward (`flywheel.policy.lora`).
    adapter: LoraAdapter | None = None
    base: LoadedModel | None = None  # with an adapter: the whole-weights version its module tree holds
    _token_text: dict[int, str] = dataclasses.field(default_factory=dict, repr=False)
    _backend_decode: Callable[[list[int]], str] | None = dataclasses.field(default=None, repr=False)

    def on_base(self, version: int, source: str) -> bool:
        """Whether this is an adapter version whose base in memory is whole-weights `version` from `source`."""
        return self.base is not None and (self.base.version, self.base.source) == (version, source)

    def token_text(self, token_id: int) -> str:
        """The text of one token (cached: the same id always decodes the same way alone)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def decode(self, ids: list[int]) -> str:
        """`tokenizer.decode(ids, skip_special_tokens=True)`, straight to the Rust tokenizer when that is
        what HF's decode does anyway (a fast tokenizer without clean-up): a few µs instead of ~20."""
        if self._backend_decode is None:
            tok = self.tokenizer
            plain = (
                isinstance(tok, PreTrainedTokenizerFast)
                and type(tok)._decode is PreTrainedTokenizerFast._decode
                and not tok.clean_up_tokenization_spaces
            )
            backend = tok.backend_tokenizer if plain else None
            self._backend_decode = (
                (lambda i: backend.decode(i, skip_special_tokens=True))
                if backend is not None
                else (lambda i: tok.decode(i, skip_special_tokens=True))
            )
        return self._backend_decode(ids)

    @property
    def incremental_detokenization(self) -> bool:
        """Whether decoding a window of tokens gives exactly the characters they add to the whole text.
        Clean-up (" ." -> ".") looks across token boundaries, so with it every step decodes it all."""
        return not self.tokenizer.clean_up_tokenization_spaces

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """A chat as prompt text through this tokenizer's template (without a leading BOS)."""
        tok = self.tokenizer
        try:
            text = str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            bos = tok.bos_token or ""
            return text[len(bos) :] if bos and text.startswith(bos) else text
        except Exception:  # noqa: BLE001 - no template: a readable transcript is good enough for the log
            return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a one-token decode step, from the 2D padding mask (B, L): a ready
        (B, 1, 1, L) mask where the model takes one (`flywheel.core.masks`)."""
        return attention_mask_4d(mask, 1, self.dtype) if self.mask_4d else mask

    def prefill_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a prefill over left-padded prompts, from the 2D padding mask (B, L).
        Ours only where transformers would build one with its vmap: with padding, up to
        PREFILL_MASK_MAX elements (past that its cost is memory, not time)."""
        b, n = mask.shape
        if not self.mask_4d or b * n * n > PREFILL_MASK_MAX or bool(mask.all()):
            return mask  # no padding: transformers' causal fast path builds no mask at all
        return attention_mask_4d(mask, n, self.dtype)

    def probe_logits(self, ids: torch.Tensor, mask: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Last-position logits (B, 2, V) of a prefill of left-padded `ids` (`mask` 1 on real tokens)
        and of one decode step of `step` (B, 1) after it: what the checks at load compare."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.forward(ids, self.prefill_mask(mask), pos, DynamicCache())
        full = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        after = self.forward(step, self.decode_mask(full), full.sum(-1, keepdim=True) - 1, out.past_key_values)
        return torch.stack([out.logits[:, -1], after.logits[:, -1]], dim=1).float()

    def same_logits(self, want: torch.Tensor, got: torch.Tensor) -> bool:
        """`got` is finite and equals `want` within this model's dtype's tolerance."""
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        return bool(torch.isfinite(got).all() and torch.allclose(want, got, atol=tol, rtol=tol))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        own_adapter: bool = True,  # False: a drain's mixed forward routes the adapters (`Batch.decode`)
    ):
        kw = {"logits_to_keep": 1} if self.logits_to_keep else {}
        on_adapter = rows_on([(self.adapter, 0)]) if own_adapter and self.adapter is not None else _NO_ADAPTER
        with on_adapter:
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **kw,
            )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for but CUDA is not available: use device=cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    return getattr(torch, name)


def load_model(path: str, version: int, config: EngineConfig) -> LoadedModel:
    """from_pretrained + a one-token smoke forward, so a broken checkpoint fails here, off the serving path."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tok = AutoTokenizer.from_pretrained(path)
    # transformers' typing of PreTrainedModel.to (a wrapped method) loses its self argument
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    cfg = model.config
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tok) > vocab:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model only {vocab} embeddings")
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not context:
        context = tok.model_max_length if tok.model_max_length < 1_000_000 else DEFAULT_CONTEXT
    eos: set[int] = set()
    for e in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos.update(e if isinstance(e, list) else [] if e is None else [e])
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
    params = inspect.signature(model.forward).parameters
    loaded = LoadedModel(
        source=path,
        version=version,
        model=model,
        tokenizer=tok,
        device=device,
        dtype=dtype,
        context=int(context),
        eos_ids=frozenset(eos),
        special_ids=frozenset(tok.all_special_ids),
        pad_id=pad,
        logits_to_keep="logits_to_keep" in params,
    )
    smoke_test(loaded)
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    loaded.mask_4d = not sliding and _same_with_4d_mask(loaded)
    loaded.routable_modules, loaded.row_weighted = routable_modules(loaded) or (None, ())
    return loaded


def smoke_test(m: LoadedModel) -> None:
    """One forward of a single pad token: refuses weights that load but produce non-finite logits."""
    probe = torch.tensor([[m.pad_id]], device=m.device)
    out = m.forward(probe, torch.ones_like(probe), torch.zeros_like(probe), DynamicCache())
    if not torch.isfinite(out.logits).all():
        raise ValueError("the model produces non-finite logits")


def _same_with_4d_mask(m: LoadedModel) -> bool:
    """Whether a padded prefill and a decode step with our 4D masks (`prefill_mask`, `decode_mask`)
    give the 2D path's logits on this model."""
    ids = torch.tensor([[m.pad_id, m.pad_id, 5, 6], [3, 4, 5, 6]], device=m.device) % len(m.tokenizer)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], device=m.device)
    step = torch.tensor([[7], [7]], device=m.device)
    logits = []
    for use_4d in (False, True):
        try:
            m.mask_4d = use_4d
            logits.append(m.probe_logits(ids, mask, step))
        except Exception:  # noqa: BLE001 - a model that rejects 4D masks uses the 2D path
            return False
        finally:
            m.mask_4d = False
    return m.same_logits(logits[0], logits[1])


class Batch:
    """Running sequences of one LoadedModel and their shared, left-padded KV cache; after a hot
    swap, also the sequences still finishing on the previous version, at the front of the batch
    (`adopt`)."""

    def __init__(self, model: LoadedModel, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor):
        self.model, self.seqs, self.cache, self.mask = model, seqs, cache, mask  # mask (B, L) long
        self.next_ids: torch.Tensor | None = None  # (B,) sampled, not yet in the cache
        self.last_logits: torch.Tensor | None = None
        self.mix: DrainForward | None = None  # while rows of mix.old remain
        self.old_rows = 0  # the first rows, on mix.old's weights

    def adopt(self, mix: DrainForward) -> None:
        """Go on with mix.new: the rows so far finish on mix.old's weights, new rows merge after them."""
        assert mix.old is self.model
        self.model, self.mix, self.old_rows = mix.new, mix, len(self.seqs)

    @classmethod
    def prefill(cls, m: LoadedModel, seqs: list[Sequence]) -> Batch:
        """One forward over the left-padded prompts; leaves their last-position logits (B, V)."""
        length = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), length), m.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, s in enumerate(seqs):
            n = len(s.prompt_ids)
            ids[b, length - n :] = torch.tensor(s.prompt_ids)
            mask[b, length - n :] = 1
        ids, mask = ids.to(m.device), mask.to(m.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = m.forward(ids, m.prefill_mask(mask), pos, DynamicCache())
        batch = cls(m, list(seqs), out.past_key_values, mask)
        batch.last_logits = out.logits[:, -1, :]
        return batch

    def decode(self) -> torch.Tensor:
        """Feed each row's last sampled token; returns next-token logits (B, V)."""
        assert self.next_ids is not None
        ones = torch.ones((len(self.seqs), 1), dtype=self.mask.dtype, device=self.mask.device)
        pos = self.mask.sum(-1, keepdim=True)  # real tokens so far = position of the new one
        mask = torch.cat([self.mask, ones], dim=1)
        model = self.model
        split: contextlib.AbstractContextManager[None] = _NO_SPLIT
        if self.mix is not None and self.old_rows == len(self.seqs):
            model = self.mix.old  # no new rows yet: the old weights' own forward
        elif self.mix is not None:
            split = self.mix.split(self.old_rows, len(self.seqs))
        with split:  # a split routes each row's adapter itself
            step_mask, ids = model.decode_mask(mask), self.next_ids[:, None]
            out = model.forward(ids, step_mask, pos, self.cache, own_adapter=split is _NO_SPLIT)
        self.cache, self.mask = out.past_key_values, mask
        return out.logits[:, -1, :]

    def filter(self, keep: list[Sequence]) -> None:
        """Keep only `keep` (in their current order), then drop leading all-padding columns."""
        wanted = {id(s) for s in keep}
        idx = [i for i, s in enumerate(self.seqs) if id(s) in wanted]
        if len(idx) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in idx]
        if self.mix is not None:  # order is kept: the old rows stay in front
            self.old_rows = sum(1 for s in self.seqs if s.model is self.mix.old)
            self.mix = self.mix if self.old_rows else None  # the last reference to the old weights
        if not idx:
            self.cache, self.mask, self.next_ids = DynamicCache(), self.mask[:0], None
            return
        t = torch.tensor(idx, device=self.mask.device)
        self.cache.batch_select_indices(t)
        self.mask = self.mask[t]
        if self.next_ids is not None:
            self.next_ids = self.next_ids[t]
        first = int((self.mask.sum(0) > 0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                assert layer.keys is not None and layer.values is not None  # a filled cache
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def merge(self, other: Batch) -> None:
        """Append `other`'s rows (same model), left-padding the shorter cache with masked zeros."""
        assert other.model is self.model and other.next_ids is not None and self.next_ids is not None
        length = max(self.mask.shape[1], other.mask.shape[1])
        pad_a, pad_b = length - self.mask.shape[1], length - other.mask.shape[1]
        for la, lb in zip(self.cache.layers, other.cache.layers, strict=True):
            assert la.keys is not None and la.values is not None and lb.keys is not None and lb.values is not None
            la.keys = torch.cat([F.pad(la.keys, (0, 0, pad_a, 0)), F.pad(lb.keys, (0, 0, pad_b, 0))])
            la.values = torch.cat([F.pad(la.values, (0, 0, pad_a, 0)), F.pad(lb.values, (0, 0, pad_b, 0))])
        self.mask = torch.cat([F.pad(self.mask, (pad_a, 0)), F.pad(other.mask, (pad_b, 0))])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.seqs = self.seqs + other.seqs
