"""One forward over a batch whose rows run on two versions of one model: a hot swap's drain.

While the answers in flight at a swap finish on the old weights (the default), new answers start
on the new ones. One forward per version made each decode step of that drain cost ~1.7x a steady
step on a small model: most of a small forward is the Python of its modules, paid twice, and so
is everything around it (masks, sampling). Here the new model's module tree runs once over all
rows. Each module that holds weights (Linear, Embedding, a norm) computes the old rows, kept at
the front of the batch, with its twin in the old model and the other rows with its own weights;
every weightless op (attention over the shared KV cache, rotary embeddings, activations) runs
once. A norm layer (one 1-D `weight` applied elementwise) runs once too, with a weight per row:
routing it ran its normalisation twice, ~45 us a norm of a small model's ~470 us drain overhead.
Each row thus gets its own version's computation, if every weighted module sees the batch's
rows, in order, as the first dimension of its input: `routable_modules` checks that once per
architecture when it is loaded. A swap to new weights of it probes and compares nothing: the CPU
a swap takes on the serving core delays the answers in flight (a probe between two decode steps
added ~4.5 ms to them; comparing configs and module trees, ~0.5 ms of the loader's). Where the check
fails (e.g. a mixture of experts, whose expert layers see a gathered subset of the rows) the
engine keeps one forward per version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from flywheel.policy.kvbatch import LoadedModel

_IGNORED_CONFIG = ("_name_or_path", "transformers_version")


class DrainForward(Protocol):
    """One forward over a batch whose first rows run on `old` and the rest on `new`: `MixedForward`
    for two module trees, `flywheel.policy.lora.AdapterMix` for adapter versions of one base."""

    old: LoadedModel
    new: LoadedModel

    def split(self, old_rows: int, rows: int) -> contextlib.AbstractContextManager[None]:
        """Within: a forward of `new` over `rows` rows runs the first `old_rows` as `old`."""
        ...


class NotRowwise(RuntimeError):
    """A weighted module got an input whose first dimension is not the batch's rows."""


def _weighted_leaves(model: nn.Module) -> tuple[str, ...]:
    return tuple(
        name
        for name, m in model.named_modules()
        if not next(m.children(), None) and next(m.parameters(recurse=False), None) is not None
    )


def _same_tree(old: LoadedModel, new: LoadedModel) -> bool:
    """Same class, config, parameter shapes and buffers: the two differ only in their weights."""

    def facts(m: LoadedModel) -> tuple:
        config = {k: v for k, v in m.model.config.to_dict().items() if k not in _IGNORED_CONFIG}
        return type(m.model), config, m.device, m.dtype, m.mask_4d, m.logits_to_keep

    if facts(old) != facts(new):
        return False
    po, pn = dict(old.model.named_parameters()), dict(new.model.named_parameters())
    if po.keys() != pn.keys() or any(po[k].shape != pn[k].shape or po[k].dtype != pn[k].dtype for k in po):
        return False
    bo, bn = dict(old.model.named_buffers()), dict(new.model.named_buffers())
    return bo.keys() == bn.keys() and all(torch.equal(bo[k], bn[k]) for k in bo)


class MixedForward:
    """The forward of `new`'s module tree whose first rows use `old`'s weights."""

    def __init__(
        self, old: LoadedModel, new: LoadedModel, modules: tuple[str, ...], row_weighted: tuple[str, ...] = ()
    ) -> None:
        self.old, self.new = old, new
        olds, news = dict(old.model.named_modules()), dict(new.model.named_modules())  # get_submodule: 4x the CPU
        self._twins = [(news[n], olds[n]) for n in modules if n not in row_weighted]
        self._scaled = [(news[n], olds[n]) for n in row_weighted]
        self._row_weights: dict[tuple[int, int], list[torch.Tensor]] = {}  # (old_rows, rows) -> one per _scaled

    @classmethod
    def pair(cls, old: LoadedModel, new: LoadedModel, same_tree: bool = False) -> MixedForward | None:
        """The mixed forward of `old` and `new`, or None where they cannot share one: an
        architecture whose modules cannot be routed, or two that differ in more than their weights.
        `same_tree`: the caller knows they do not (`flywheel.policy.reload` made `new`)."""
        modules = old.routable_modules
        if modules is None or new.routable_modules != modules or new.row_weighted != old.row_weighted:
            return None
        return cls(old, new, modules, old.row_weighted) if same_tree or _same_tree(old, new) else None

    @contextlib.contextmanager
    def split(self, old_rows: int, rows: int) -> Iterator[None]:
        """Within: a forward of `new` over `rows` rows runs the first `old_rows` on `old`'s weights."""
        # object's own setattr/delattr (0.3 us a pair): nn.Module's look for a parameter, buffer or
        # submodule of that name first (2.1 us), for every weighted module at every decode step
        for new_mod, old_mod in self._twins:
            object.__setattr__(new_mod, "forward", routed(new_mod, old_mod, old_rows, rows))
        for (new_mod, _), weight in zip(self._scaled, self._weights_by_row(old_rows, rows), strict=True):
            object.__setattr__(new_mod, "weight", weight)  # shadows the parameter until restored
            object.__setattr__(new_mod, "forward", _row_checked(new_mod, rows))
        try:
            yield
        finally:
            for new_mod, _ in self._twins:
                object.__delattr__(new_mod, "forward")  # back to the class's forward
            for new_mod, _ in self._scaled:
                object.__delattr__(new_mod, "forward")
                object.__delattr__(new_mod, "weight")  # back to the parameter

    def _weights_by_row(self, old_rows: int, rows: int) -> list[torch.Tensor]:
        """Each norm's weight as [rows, 1, H]: the old weight's rows first. Cached: a drain's steps
        mostly repeat the previous step's rows."""
        key = (old_rows, rows)
        got = self._row_weights.get(key)
        if got is None:
            if len(self._row_weights) >= 4:
                self._row_weights.clear()
            got = self._row_weights[key] = [
                torch.cat((o.weight.expand(old_rows, 1, -1), n.weight.expand(rows - old_rows, 1, -1)))
                for n, o in self._scaled
            ]
        return got

    def _probe(self) -> bool:
        """A padded prefill and one decode step of 2 + 2 rows, mixed against separate forwards."""
        m = self.new
        vocab = len(m.tokenizer)
        ids = torch.arange(3, 23, device=m.device).reshape(4, 5) % vocab  # 5 tokens: not to be taken for 4 rows
        mask = torch.tensor([[0, 1, 1, 1, 1], [1] * 5, [0, 0, 0, 1, 1], [1] * 5], device=m.device)
        ids[mask == 0] = m.pad_id
        step = torch.tensor([[16], [17], [18], [19]], device=m.device) % vocab
        separate = torch.cat(
            [self.old.probe_logits(ids[:2], mask[:2], step[:2]), m.probe_logits(ids[2:], mask[2:], step[2:])]
        )
        with self.split(2, 4):
            mixed = m.probe_logits(ids, mask, step)
        return m.same_logits(separate, mixed)


def routable_modules(m: LoadedModel) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The names of `m`'s weighted modules if each sees the batch's rows first, in order (the mixed
    forward of `m` with itself gives one forward's logits), and those among them that take a weight
    per row (`scales_rows`), else None. Architectural, so checked once per load of an architecture
    (reloaded weights inherit it); a module that takes more than its input, or one that wraps its
    own forward (e.g. accelerate's offloading hooks), fails it."""
    modules, named = _weighted_leaves(m.model), dict(m.model.named_modules())
    if any("forward" in vars(named[n]) for n in modules):
        return None
    row_weighted = tuple(n for n in modules if scales_rows(named[n]))
    for scaled in dict.fromkeys((row_weighted, ())):  # per-row weights if the whole model agrees
        try:
            if MixedForward(m, m, modules, scaled)._probe():
                return modules, scaled
        except Exception:  # noqa: BLE001 - NotRowwise, or a module whose forward takes other arguments
            pass
    return None


def scales_rows(mod: nn.Module) -> bool:
    """Whether `mod` holds one 1-D `weight` whose forward over [rows, seq, H] with that weight as
    [rows, 1, H] gives each row what its own weight gives: a norm layer (RMSNorm, Gemma's 1 + w).
    Then a drain runs its normalisation once for both versions' rows."""
    params = dict(mod.named_parameters(recurse=False))
    if params.keys() != {"weight"} or params["weight"].dim() != 1 or "weight" in vars(mod):
        return False
    w, forward = params["weight"], type(mod).forward
    try:
        with torch.no_grad():
            gen = torch.Generator(device=w.device).manual_seed(0)
            x = torch.randn(3, 2, w.shape[0], generator=gen, device=w.device).to(w.dtype)
            weights = [w * (1 + 0.25 * i) for i in range(3)]
            alone = []
            for i, wi in enumerate(weights):
                object.__setattr__(mod, "weight", wi)
                alone.append(forward(mod, x[i : i + 1]))
            object.__setattr__(mod, "weight", torch.stack(weights)[:, None])
            together = forward(mod, x)
        torch.testing.assert_close(together, torch.cat(alone))
        return True
    except Exception:  # noqa: BLE001 - another shape or result: route it like any weighted module
        return False
    finally:
        if "weight" in vars(mod):
            object.__delattr__(mod, "weight")


def _row_checked(mod: nn.Module, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    fwd = type(mod).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != rows:  # its weight is [rows, 1, H]: only this shape gets each row's
            raise NotRowwise(f"{type(mod).__name__} got {tuple(x.shape)} for a batch of {rows} rows")
        return fwd(mod, x)

    return forward


def routed(new_mod: nn.Module, old_mod: nn.Module, old_rows: int, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward for `new_mod` that runs the first `old_rows` rows through `old_mod` instead."""
    new_fwd, old_fwd = type(new_mod).forward, type(old_mod).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != rows:
            raise NotRowwise(f"{type(new_mod).__name__} got {tuple(x.shape)} for a batch of {rows} rows")
        return torch.cat([old_fwd(old_mod, x[:old_rows]), new_fwd(new_mod, x[old_rows:])])

    return forward
