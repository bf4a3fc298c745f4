"""LoRA adapter versions served unmerged, on the base weights the engine already holds.

An adapter version (PEFT's layout, as the trainer writes it: `adapter_config.json` and
`adapter_model.safetensors`) is read into two small matrices per targeted Linear, A (r, in) and
B (out, r), and PEFT's scaling (lora_alpha / r; / sqrt(r) with rsLoRA). Nothing of the base is
copied: the adapter's `LoadedModel` shares the serving one's module tree, and a forward on it adds
`scaling * B(A(x))` to each targeted Linear's output (Hu et al. 2021, arXiv 2106.09685; PEFT's
`LoraLayer.forward`, whose dropout is off at inference). A swap to an adapter version thus reads,
verifies and moves only the adapter's megabytes.

During a swap's drain, the rows still finishing on the previous version (at the front of the batch)
and those of the new one share one forward (`AdapterMix`): every module runs once over all rows,
and each targeted Linear adds to each row its own version's delta (none for rows of the base
itself). vLLM serves many LoRAs in one batch the same way (Punica's SGMV, Chen et al. 2023).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from flywheel.policy.mixed import NotRowwise

if TYPE_CHECKING:
    from flywheel.policy.kvbatch import LoadedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class UnsupportedAdapter(ValueError):
    """An adapter this engine cannot apply unmerged (e.g. DoRA, or extra trained modules)."""


@dataclasses.dataclass(frozen=True)
class LoraDelta:
    """One targeted Linear's low-rank update: x -> scaling * B(A(x))."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b) * self.scaling


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """An adapter read against one module tree: its delta for each targeted module of that tree."""

    deltas: tuple[tuple[nn.Linear, LoraDelta], ...]
    nbytes: int

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        """Read the adapter at `path` for `model`'s modules; UnsupportedAdapter or ValueError says what does not fit.
        Its matrices must be finite: that is the adapter's smoke test (a forward of the whole model, as whole
        weights get, cost a swap on a 0.5B model 0.18 s of its 0.2; the base had its own at its load)."""
        path = Path(path)
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        scaling = _scaling(cfg)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(path / ADAPTER_WEIGHTS, device="cpu").items():
            m = _KEY.match(key)
            if m is None:
                raise UnsupportedAdapter(f"tensor {key!r} is not a LoRA A or B matrix of a Linear")
            pairs.setdefault(m["module"], {})[m["ab"]] = tensor
        if not pairs:
            raise ValueError(f"{path / ADAPTER_WEIGHTS} holds no LoRA matrices")
        modules = dict(model.named_modules())
        deltas, nbytes = [], 0
        for name, ab in sorted(pairs.items()):
            mod = modules.get(name)
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"the adapter targets {name!r}, which is not a Linear of the served model")
            if ab.keys() != {"A", "B"}:
                raise ValueError(f"the adapter has only lora_{''.join(ab)} for {name!r}")
            a, b = ab["A"], ab["B"]
            if (
                a.dim() != 2
                or b.dim() != 2
                or a.shape[1] != mod.in_features
                or b.shape != (mod.out_features, a.shape[0])
            ):
                raise ValueError(
                    f"the adapter's matrices for {name!r} are {tuple(a.shape)} and {tuple(b.shape)}, which do not fit "
                    f"a Linear of {mod.in_features} -> {mod.out_features}: is it for another base?"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"the adapter's matrices for {name!r} hold non-finite values")
            a, b = a.to(device, dtype), b.to(device, dtype)
            deltas.append((mod, LoraDelta(a, b, scaling)))
            nbytes += a.nbytes + b.nbytes
        return cls(tuple(deltas), nbytes)


def _scaling(cfg: dict) -> float:
    """PEFT's LoRA scaling, after refusing what an unmerged delta per Linear does not compute."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are served")
    for field, fine in (
        ("use_dora", False),
        ("fan_in_fan_out", False),
        ("bias", "none"),
        ("lora_bias", False),
        ("modules_to_save", None),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
    ):
        got = cfg.get(field, fine)
        if (got or None) != (fine or None):  # an empty list or mapping is as good as none
            raise UnsupportedAdapter(f"adapter_config {field}={got!r} is not served unmerged (only {fine!r})")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


Part = tuple[LoraAdapter | None, int]  # an adapter (None: the base alone) and its count of consecutive rows


@contextlib.contextmanager
def rows_on(parts: list[Part]) -> Iterator[None]:
    """Within: each targeted Linear adds each part's delta to that part's rows (the batch's first rows
    belong to the first part). One part: its delta on every row, whatever the batch's size."""
    rows = sum(n for _, n in parts)
    by_module: dict[int, tuple[nn.Linear, list[LoraDelta | None]]] = {}
    for i, (adapter, _) in enumerate(parts):
        for mod, delta in adapter.deltas if adapter is not None else ():
            by_module.setdefault(id(mod), (mod, [None] * len(parts)))[1][i] = delta
    counts = [n for _, n in parts]
    # object's own setattr/delattr, as flywheel.policy.mixed does (nn.Module's are 7x slower)
    for mod, deltas in by_module.values():
        object.__setattr__(mod, "forward", _with_deltas(mod, deltas, counts, rows))
    try:
        yield
    finally:
        for mod, _ in by_module.values():
            object.__delattr__(mod, "forward")


def _with_deltas(
    mod: nn.Linear, deltas: list[LoraDelta | None], counts: list[int], rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    base = nn.Linear.forward
    if len(deltas) == 1:
        delta = deltas[0]
        assert delta is not None
        return lambda x: base(mod, x) + delta(x)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != rows:
            raise NotRowwise(f"Linear got {tuple(x.shape)} for a batch of {rows} rows")
        out = base(mod, x)
        lo = 0
        for delta, n in zip(deltas, counts, strict=True):
            if delta is not None and n:
                out[lo : lo + n] += delta(x[lo : lo + n])
            lo += n
        return out

    return forward


class AdapterMix:
    """The drain of a swap between two versions on one module tree (either may be the base alone):
    the interface of `flywheel.policy.mixed.MixedForward` that `kvbatch.Batch` uses."""

    def __init__(self, old: LoadedModel, new: LoadedModel) -> None:
        assert old.model is new.model, "adapter versions of one base share its module tree"
        self.old, self.new = old, new

    @contextlib.contextmanager
    def split(self, old_rows: int, rows: int) -> Iterator[None]:
        with rows_on([(self.old.adapter, old_rows), (self.new.adapter, rows - old_rows)]):
            yield
