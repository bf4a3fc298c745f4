"""Checkpoint/resume of the trainer's own state, and the single-active-trainer lock.

The policy weights of a checkpoint are a model-store version (what the policy replicas
load). Everything else the trainer needs to continue *exactly* lives next to it, in
`<store>/<model>/.trainer/state.pt` (never listed as a version, never shipped to replicas),
a `SavedState`:

  step, the policy version the weights are, the serving version, value head, optimizer,
  KL controller, reward-normalization moments, torch and Python RNG states, the
  consumed offsets (Kafka partitions and the prompt-pool cursor), and with LoRA the adapter's
  tensors (a few MB: the state is whole without reading the version back).

state.pt lies on the shared store volume, which other pods can write, so it is never unpickled:
it holds only tensors, numbers, strings and containers of them (`_plain`), and is read with
`torch.load(weights_only=True)`, which builds nothing else. A file with anything more (written
by a trainer before this rule, or planted) is refused with what to do, and no code in it runs.

Order of a checkpoint (`Trainer.checkpoint`): publish the version -> write state.pt atomically ->
commit the Kafka offsets -> gate. A crash between the first two leaves an "orphan" version
that no state refers to: on restart it is marked as such and never gated or announced, and
training resumes from the state (so no committed work is repeated or skipped: the records
consumed after the last state.pt are read again, those before it never are).

Only one trainer is active per model: it holds an exclusive `fcntl.flock` on
`.trainer/active.lock` for its lifetime; the kernel drops it when the process dies (even by
SIGKILL), and a standby replica that polls for it then takes over.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import random
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flywheel.core import errors
from flywheel.core.modelstore import write_atomic

STATE_FILE = "state.pt"
CONTROL_FILE = "control.json"
LOCK_FILE = "active.lock"


def trainer_dir(store_root: str | os.PathLike, model: str) -> Path:
    d = Path(store_root).expanduser() / model / ".trainer"
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclasses.dataclass
class RngState:
    """Every RNG the loop draws from: torch CPU and CUDA, Python's random."""

    cpu: torch.Tensor
    python: tuple[Any, ...]
    cuda: list[torch.Tensor] | None = None

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(torch.random.get_rng_state(), random.getstate(), cuda)

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        random.setstate(self.python)
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"torch": self.cpu, "python": self.python}
        if self.cuda is not None:
            out["cuda"] = self.cuda
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RngState:
        return cls(d["torch"], d["python"], d.get("cuda"))


@dataclasses.dataclass
class SavedState:
    """The trainer's state.pt: everything besides the published weights needed to continue exactly.

    On disk it is the plain dict of `to_dict` (torch.save), so files written before this class
    existed load unchanged.
    """

    step: int
    version: int  # the store version holding the policy weights of this state
    serving_version: int
    value_head: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch.optim state_dict
    kl_ctl: dict[str, float]
    moments: dict[str, float]
    rng: RngState
    offsets: dict[str, int]  # consumed positions of the prompt source
    metrics: dict[str, float]  # of the last step
    config: dict[str, Any]  # the TrainerConfig that wrote it, for the record
    adapter: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # LoRA tensors (else empty)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "version": self.version,
            "serving_version": self.serving_version,
            "value_head": self.value_head,
            "optimizer": self.optimizer,
            "kl_ctl": self.kl_ctl,
            "moments": self.moments,
            "rng": self.rng.to_dict(),
            "offsets": self.offsets,
            "metrics": self.metrics,
            "config": self.config,
            "adapter": self.adapter,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedState:
        return cls(
            step=int(d["step"]),
            version=int(d["version"]),
            serving_version=int(d["serving_version"]),
            value_head=d["value_head"],
            optimizer=d["optimizer"],
            kl_ctl=d["kl_ctl"],
            moments=d["moments"],
            rng=RngState.from_dict(d["rng"]),
            offsets={k: int(v) for k, v in d["offsets"].items()},
            metrics=dict(d.get("metrics", {})),
            config=dict(d.get("config", {})),
            adapter=dict(d.get("adapter", {})),
        )


def _plain(x: Any) -> Any:
    """`x` as what `torch.load(weights_only=True)` reads back: tensors, numbers, strings, None and
    dicts, lists and tuples of them (a numpy scalar becomes its number; anything else, e.g. a Path
    in the config, which is kept for the record only, its text)."""
    if x is None or isinstance(x, torch.Tensor) or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, Mapping):
        return {k if type(k) in (str, int) else str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        items = [_plain(v) for v in x]
        return tuple(items) if isinstance(x, tuple) else items
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def save_state(directory: Path, saved: SavedState) -> None:
    """Write state.pt atomically (temp file, fsync, rename): a crash leaves the old or the new one."""
    data = _plain(saved.to_dict())
    write_atomic(directory / STATE_FILE, lambda f: torch.save(data, f))


def load_state(directory: Path) -> SavedState | None:
    """The last saved state, or None for a trainer that never checkpointed; FailedPrecondition for a
    file that holds more than tensors and plain values (never unpickled: see the module's doc)."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((x for x in lines if x.startswith("WeightsUnpickler error:")), "not a torch file").split(". ")[0]
        raise errors.FailedPrecondition(
            f"trainer state {path} holds more than tensors and plain values (written by an older trainer, "
            f"or by someone else: {detail}); it is not unpickled, since that could run code. Move it away "
            "to resume from the serving version with a fresh optimizer: the next checkpoint writes a plain one"
        ) from None
    return SavedState.from_dict(data)


def save_control(directory: Path, control: dict[str, Any]) -> None:
    """Operator decisions that survive a restart (paused, and why)."""
    write_atomic(directory / CONTROL_FILE, lambda f: f.write(json.dumps(control).encode()))


def load_control(directory: Path) -> dict[str, Any]:
    path = directory / CONTROL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class ActiveLock:
    """An exclusive flock: held by the one active trainer, waited for by standbys."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def wait(self, stop: threading.Event, poll_s: float) -> bool:
        """Block until the lock is ours (True) or `stop` is set (False)."""
        while not stop.is_set():
            if self.try_acquire():
                return True
            stop.wait(poll_s)
        return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
