"""New weights for the serving architecture, loaded into a copy of the serving model while it serves.

A trainer's new version is the same architecture with new weights, so the engine skips
from_pretrained (config parsing, module construction, the 4D-mask check of `load_model`: tens of
ms of Python) and fills a copy of the serving module tree from the safetensors files instead.

Where the work runs matters more than how long it takes. The loader thread shares the GIL with
the scheduler thread, and a decode step releases and re-takes it around every torch op: a loader
busy in Python (comparing files, building the module tree, a smoke forward) makes each of those
re-takes wait, and a 0.5 ms step took 4-10 ms while it ran. So the Python-heavy parts run as
chores *between* two decode steps, in the scheduler thread (`between_steps`); only the tensor
copies, which hold the GIL for microseconds per op, run in the loader's thread.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flywheel.core.modelstore import MANIFEST
from flywheel.policy.kvbatch import LoadedModel, smoke_test

log = logging.getLogger(__name__)
T = TypeVar("T")
Chore = Callable[[Callable[[], T]], T]  # runs a function between two decode steps, returns its result


def _now(fn: Callable[[], T]) -> T:
    return fn()


def reload_weights(cur: LoadedModel, path: str, version: int, between_steps: Chore = _now) -> LoadedModel | None:
    """`path` as a copy of `cur` with the weights of `path`, or None where it may be another model:
    its config.json or generation_config.json differ, its tokenizer differs in what the engine
    derives from it, or its safetensors files do not set exactly `cur`'s tensors.

    Memory stays at two copies: the old and this one, plus one tensor in flight. The smoke test
    still checks the new weights; the 4D-mask and routable-modules checks carry over (they depend on the architecture).
    """
    old, new = Path(cur.source), Path(path)
    if not old.is_dir() or not new.is_dir():
        return None  # e.g. served from a hub name
    plan = _same_model_files(old, new)  # file reads: they release the GIL
    if plan is None:
        return None
    weights, same_tokenizer = plan
    tok = cur.tokenizer if same_tokenizer else between_steps(lambda: _equivalent_tokenizer(cur, new))
    if tok is None:
        return None
    model = between_steps(lambda: _empty_copy(cur.model))
    params = dict(model.named_parameters())  # a tied weight appears once, as in the saved file
    tensors, seen = params | dict(model.named_buffers()), set()
    with torch.no_grad():
        for w in weights:
            with safe_open(new / w, framework="pt") as f:
                for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    t, src = tensors.get(k), f.get_tensor(k)
                    if t is None or t.shape != src.shape:
                        return None
                    # To the device first: a CPU->GPU copy_ that changes the dtype converts on the
                    # CPU (one core under OMP_NUM_THREADS=1); on the GPU it is free.
                    t.copy_(src.to(t.device, non_blocking=False))
                    seen.add(k)
    if not seen >= params.keys():
        return None  # a parameter the files do not set: let from_pretrained decide
    loaded = dataclasses.replace(cur, source=path, version=version, model=model, tokenizer=tok)
    if tok is not cur.tokenizer:  # caches of the old tokenizer
        loaded = dataclasses.replace(loaded, _token_text={}, _backend_decode=None)
    between_steps(lambda: smoke_test(loaded))
    return loaded


def try_reload(cur: LoadedModel, path: str, version: int, between_steps: Chore = _now) -> LoadedModel | None:
    """reload_weights, or None on any error: from_pretrained then decides (it refuses what is broken)."""
    try:
        return reload_weights(cur, path, version, between_steps)
    except Exception as e:  # noqa: BLE001 - e.g. a module whose deepcopy fails: the slow path still works
        log.warning(
            "reloading the weights of %s into a copy failed (%s: %s): loading it whole", path, type(e).__name__, e
        )
        return None


def _same_model_files(old: Path, new: Path) -> tuple[list[str], bool] | None:
    """The safetensors files of `new` and whether its tokenizer files are `old`'s, or None if `new`
    may be another model (its config files differ)."""

    def files(d: Path) -> set[str]:
        return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {MANIFEST}

    def same(n: str) -> bool:
        return (old / n).is_file() == (new / n).is_file() and (
            not (new / n).is_file() or (old / n).read_bytes() == (new / n).read_bytes()
        )

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


def _empty_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deepcopy of the module tree whose parameters are allocated but not copied (the files are
    about to set them): only the Python objects and the buffers are duplicated. A forward running on
    `model` meanwhile is safe: it changes no module."""
    memo: dict[int, object] = {
        id(p): torch.nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad) for p in model.parameters()
    }
    return copy.deepcopy(model, memo)
