"""New weights for the serving architecture, loaded into a copy of the serving model while it serves.

A trainer's new version is the same architecture with new weights, so the engine skips
from_pretrained (config parsing, module construction, the 4D-mask check of `load_model`: tens of
ms of Python) and fills a copy of the serving module tree from the safetensors files instead, or
makes the swap worker's verified snapshot of them its parameters (`map_safetensors`).

Where the work runs matters more than how long it takes. The loader thread shares the GIL with
the scheduler thread, and a decode step releases and re-takes it around every torch op: a loader
busy in Python (comparing files, building the module tree, a smoke forward) makes each of those
re-takes wait, and a 0.5 ms step took 4-10 ms while it ran. So the Python-heavy parts run as
chores *between* two decode steps, in the scheduler thread (`between_steps`); only the tensor
copies, which hold the GIL for microseconds per op, run in the loader's thread.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core.modelstore import MANIFEST
from flywheel.policy.kvbatch import LoadedModel, smoke_test

log = logging.getLogger(__name__)
T = TypeVar("T")
Chore = Callable[[Callable[[], T]], T]  # runs a function between two decode steps, returns its result


def _now(fn: Callable[[], T]) -> T:
    return fn()


def reload_weights(
    cur: LoadedModel,
    path: str,
    version: int,
    between_steps: Chore = _now,
    weights: MappedWeights | None = None,
) -> LoadedModel | None:
    """`path` as a copy of `cur` with the weights of `path`, or None where it may be another model:
    its config.json or generation_config.json differ, its tokenizer differs in what the engine
    derives from it, or its safetensors files do not set exactly `cur`'s tensors.

    `weights`: the tensors of `path`'s safetensors files, already read (the swap worker's verified
    snapshot, `map_safetensors`); a parameter whose dtype, device and shape match is that tensor,
    with no copy. Memory stays at two copies: the old and this one, plus one tensor in flight. The
    smoke test still checks the new weights; the 4D-mask and routable-modules checks carry over
    (they depend on the architecture).
    """
    old, new = Path(cur.source), Path(path)
    if not old.is_dir() or not new.is_dir():
        return None  # e.g. served from a hub name
    plan = _same_model_files(old, new)  # file reads: they release the GIL
    if plan is None:
        return None
    files, same_tokenizer = plan
    tok = cur.tokenizer if same_tokenizer else between_steps(lambda: _equivalent_tokenizer(cur, new))
    if tok is None:
        return None
    model = between_steps(lambda: empty_copy(cur.model, weights))
    params = dict(model.named_parameters())  # a tied weight appears once, as in the saved file
    tensors, seen = params | dict(model.named_buffers()), set()
    with torch.no_grad():
        for k, src in weights.items() if weights is not None else _read(new, files):
            t = tensors.get(k)
            if t is None or t.shape != src.shape:
                return None
            if t.data_ptr() != src.data_ptr():  # else it is the snapshot's tensor itself
                # To the device first: a CPU->GPU copy_ that changes the dtype converts on the
                # CPU (one core under OMP_NUM_THREADS=1); on the GPU it is free.
                t.copy_(src.to(t.device, non_blocking=False))
                if weights is not None:
                    weights.release(k)
            seen.add(k)
    if not seen >= params.keys():
        return None  # a parameter the files do not set: let from_pretrained decide
    loaded = dataclasses.replace(cur, source=path, version=version, model=model, tokenizer=tok, adapter=None)
    if tok is not cur.tokenizer:  # caches of the old tokenizer
        loaded = dataclasses.replace(loaded, _token_text={}, _backend_decode=None)
    between_steps(lambda: smoke_test(loaded))
    return loaded


def try_reload(cur: LoadedModel, path: str, version: int, **options: Any) -> LoadedModel | None:
    """reload_weights(cur, path, version, **options), or None on any error: from_pretrained then
    decides (it refuses what is broken)."""
    try:
        return reload_weights(cur, path, version, **options)
    except Exception as e:  # noqa: BLE001 - e.g. a module that cannot be cloned: the slow path still works
        log.warning(
            "reloading the weights of %s into a copy failed (%s: %s): loading it whole", path, type(e).__name__, e
        )
        return None


def _same_model_files(old: Path, new: Path) -> tuple[list[str], bool] | None:
    """The safetensors files of `new` and whether its tokenizer files are `old`'s, or None if `new`
    may be another model (its config files differ)."""

    # os, not pathlib: this runs in the loader thread, whose Python shares the interpreter lock
    # with the decode steps (pathlib's globbing was a third of the loader's CPU per swap)
    def files(d: Path) -> set[str]:
        found: set[str] = set()
        for root, _, names in os.walk(d):
            rel = os.path.relpath(root, d)
            found.update(n if rel == "." else f"{rel}/{n}" for n in names if os.path.isfile(os.path.join(root, n)))
        return found - {MANIFEST}

    def read(d: Path, n: str) -> bytes | None:
        try:
            with open(os.path.join(d, n), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def same(n: str) -> bool:
        return read(old, n) == read(new, n)

    names, model_files = files(new), ("config.json", "generation_config.json")
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights or not all(same(n) for n in model_files):
        return None
    return weights, names == files(old) and all(same(n) for n in names - set(weights))


def _equivalent_tokenizer(cur: LoadedModel, new: Path) -> PreTrainedTokenizerBase | None:
    """`new`'s tokenizer (its files differ: a starter's do from a trainer's), or None if the engine
    would read it otherwise than `cur`'s."""
    tok = AutoTokenizer.from_pretrained(new)

    def derived(t: PreTrainedTokenizerBase) -> tuple:  # what load_model reads from a tokenizer
        return len(t), t.eos_token_id, t.pad_token_id, t.all_special_ids, t.model_max_length

    return tok if derived(tok) == derived(cur.tokenizer) else None


def _read(d: Path, files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for w in files:
        with safe_open(d / w, framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield k, f.get_tensor(k)


def empty_copy(model: PreTrainedModel, reuse: Mapping[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A copy of the module tree whose parameters are `reuse`'s tensor of the same name where it fits
    (dtype, device, shape), else allocated but not copied (the files are about to set them): only
    the modules and the buffers are duplicated. A forward running on `model` meanwhile is safe: it
    changes no module."""
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters():  # a tied weight once, under its first name
        src = reuse.get(name) if reuse else None
        fits = src is not None and (src.dtype, src.device, src.shape) == (p.dtype, p.device, p.shape)
        data = src if src is not None and fits else torch.empty_like(p)
        params[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    copy = _clone_tree(model, params, {})
    assert isinstance(copy, PreTrainedModel)  # a new object of model's own class
    return copy


_CONTAINERS = (dict, collections.OrderedDict, list, set)


def _clone_tree(m: nn.Module, params: dict[int, torch.nn.Parameter], done: dict[int, nn.Module]) -> nn.Module:
    """`m` and its submodules as new module objects with `params` for their parameters and copies of
    their buffers; other attributes (config, flags) are shared, and containers (hooks, registries)
    copied. copy.deepcopy did the same and more (every attribute deep) in 3-4x the time, and this
    runs between two decode steps, where every answer in flight waits for it."""
    if id(m) in done:  # a module that appears twice in the tree stays one module
        return done[id(m)]
    new = done[id(m)] = object.__new__(type(m))
    attrs = {k: type(v)(v) if type(v) in _CONTAINERS else v for k, v in vars(m).items()}
    attrs["_parameters"] = {k: None if p is None else params[id(p)] for k, p in m._parameters.items()}
    attrs["_buffers"] = {k: None if b is None else b.clone() for k, b in m._buffers.items()}
    attrs["_modules"] = {k: None if c is None else _clone_tree(c, params, done) for k, c in m._modules.items()}
    new.__dict__.update(attrs)
    return new


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MappedWeights(dict):
    """name -> tensor of the swap worker's snapshot, views of shared mappings (`map_safetensors`)."""

    def __init__(self) -> None:
        super().__init__()
        self._spans: dict[str, tuple[mmap.mmap, int, int]] = {}

    def release(self, name: str) -> None:
        """Give the pages only `name` uses back to the kernel, once it was copied elsewhere (another
        dtype or device): memory then holds two copies of the weights, not three."""
        mm, begin, end = self._spans[name]
        lo, hi = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)


def map_safetensors(files: Iterable[tuple[str, int, int]]) -> MappedWeights:
    """The tensors of safetensors files held in memfds (the swap worker's (name, fd, size)) as views
    of one shared mapping per file, which lives as long as any of its tensors: no copy (safetensors'
    own `get_tensor` copies each tensor). The format: an 8-byte little-endian header length, a JSON
    header of {name: {dtype, shape, data_offsets}}, then the data."""
    out = MappedWeights()
    for _, fd, size in files:
        mm = mmap.mmap(fd, size)
        n = int.from_bytes(mm[:8], "little")
        header = json.loads(mm[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, h in header.items():
            dtype, (begin, end) = _DTYPES[h["dtype"]], h["data_offsets"]
            offset, count = 8 + n + begin, (end - begin) // dtype.itemsize
            if count == 0:
                t = torch.empty(0, dtype=dtype)
            elif offset % dtype.itemsize:  # a misaligned tensor: an aligned copy of its bytes
                t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=offset).clone().view(dtype)
            else:
                t = torch.frombuffer(mm, dtype=dtype, count=count, offset=offset)
            out[name] = t.reshape(h["shape"])
            out._spans[name] = (mm, offset, offset + end - begin)
    return out
