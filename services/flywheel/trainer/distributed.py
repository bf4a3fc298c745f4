"""The trainer on N processes: data parallel with torch.distributed, launched by torchrun.

    torchrun --nproc-per-node 2 -m flywheel.trainer     # on one machine
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:29400 -m flywheel.trainer

Rank 0 is the trainer service as on one process: it takes the prompts (Kafka), serves the control
RPCs, checkpoints, gates and announces. Before every step it shares with the other ranks what to do
(`Command`: the step, a restart from a version, or stop) and the step's prompts; every rank then
generates and scores its share of the rollout (whole prompt groups, so RLOO's and GRPO's baselines
stay on one rank), and the update's gradients are averaged across ranks by DistributedDataParallel.
What is computed over the whole batch stays global: reward normalization sees every rank's scores,
PPO's advantage whitening and every loss are normalized by the global token count, and the adaptive
KL controller is fed the global mean KL. Sampling draws each row from its own generator, seeded by
(seed, step, the row's index in the global batch), so a step's rollout and result do not depend on
the number of ranks (tests/integration/test_distributed_trainer.py checks 1 against 2 ranks). The
trainer on one process without torchrun samples from torch's global RNG as it always has.

Backend: NCCL where the trainer's device is CUDA, else gloo (the CPU). One process alone (no torchrun,
or a world of 1) is `Alone`: every collective is the identity.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

# The ranks wait on rank 0 between steps for as long as it waits (paused, waiting for the reward model):
# a collective's timeout must outlast that. A rank that dies ends the group sooner (torchrun's agent).
IDLE_TIMEOUT = datetime.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class Command:
    """What rank 0 tells the others before each step."""

    op: str  # "step" or "stop"
    restart: int | None = None  # train on from this version with a fresh optimizer first
    prompts: tuple[str, ...] = ()  # the step's prompts, the whole batch


class Group(Protocol):
    """The ranks training one policy together."""

    rank: int
    world: int
    # Each rollout row samples from its own generator seeded by its place in the whole batch: the rollout
    # is then the same on any number of ranks. Alone keeps torch's global RNG (the one-process trainer's).
    row_seeded: bool

    @property
    def main(self) -> bool:
        """Rank 0: the one that consumes, checkpoints, gates and announces."""
        ...

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank (what the others pass is ignored)."""
        ...

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (the same shape on each), concatenated in rank order along dim 0."""
        ...

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `t`."""
        ...

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` with its gradients averaged across ranks in backward (DDP), or itself alone."""
        ...


class Alone:
    """One process: every collective is the identity."""

    rank, world, row_seeded = 0, 1, False

    @property
    def main(self) -> bool:
        return True

    def share(self, obj: Any) -> Any:
        return obj

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def wrap(self, module: nn.Module) -> nn.Module:
        return module


class TorchGroup:
    """The default process group (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, ...)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            store = _attempt_store(rank, world)
            dist.init_process_group(self.backend, store=store, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.row_seeded = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, obj: Any) -> Any:
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store of this attempt of the group (torchrun: TORCHELASTIC_RESTART_COUNT). After torchrun's
    agent restarted a group whose rank died, its store still held the old attempt's addresses, and the new
    ranks tried to connect to processes that were gone; a prefix per attempt keeps them apart."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent,
        timeout=IDLE_TIMEOUT,
    )
    return dist.PrefixStore(f"flywheel-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def group_for(device: str) -> Group:
    """A TorchGroup under torchrun (also of one process: it trains as any number of ranks would), else
    Alone. Under torchrun each rank takes the CUDA device of its LOCAL_RANK."""
    if not launched_by_torchrun():
        return Alone()
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return TorchGroup(dev)


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of `row` of the global batch at `step` (independent of the number of ranks)."""
    return ((seed * 1_000_003 + step) * 1_000_003 + row) & 0x7FFF_FFFF_FFFF_FFFF
