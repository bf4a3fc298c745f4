"""Checkpoint/resume of the trainer's own state, and the single-active-trainer lock.

The policy weights of a checkpoint are a model-store version (what the policy replicas
load). Everything else the trainer needs to continue *exactly* lives next to it, in
`<store>/<model>/.trainer/state.pt` (never listed as a version, never shipped to replicas):

  step, the policy version the weights are, the serving version, value head, optimizer,
  KL controller, reward-normalization moments, torch and Python RNG states, and the
  consumed offsets (Kafka partitions and the prompt-pool cursor).

Order of a checkpoint (checkpoints.py): publish the version -> write state.pt atomically ->
commit the Kafka offsets -> gate. A crash between the first two leaves an "orphan" version
that no state refers to: on restart it is marked as such and never gated or announced, and
training resumes from the state (so no committed work is repeated or skipped: the records
consumed after the last state.pt are read again, those before it never are).

Only one trainer is active per model: it holds an exclusive `fcntl.flock` on
`.trainer/active.lock` for its lifetime; the kernel drops it when the process dies (even by
SIGKILL), and a standby replica that polls for it then takes over.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import torch

from flywheel.core.modelstore import write_atomic

STATE_FILE = "state.pt"
CONTROL_FILE = "control.json"
LOCK_FILE = "active.lock"


def trainer_dir(store_root: str | os.PathLike, model: str) -> Path:
    d = Path(store_root).expanduser() / model / ".trainer"
    d.mkdir(parents=True, exist_ok=True)
    return d


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (torch CPU and CUDA, Python's random)."""
    state: dict[str, Any] = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """Write state.pt atomically (temp file, fsync, rename): a crash leaves the old or the new one."""
    write_atomic(directory / STATE_FILE, lambda f: torch.save(state, f))


def load_state(directory: Path) -> dict[str, Any] | None:
    """The last saved state, or None for a trainer that never checkpointed."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


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
