"""Data-parallel training (torch.distributed) that gives the results of one process.

How many processes (`processes`): `train.processes` if set, else `train.gpus`
when CUDA is available, else 1. One process trains on the CPU as always; more
are started by `launch` with torchrun (`python -m torch.distributed.run
--standalone -m <module>`, the train stage's own entry point), one per GPU with
NCCL, or on the CPU with gloo where no GPU is visible (`train.processes: 2` on
a CPU machine: how the tests check it). This module imports no stage.

Each rank computes the loss of its contiguous part of every global batch
(`World.part`, passed to the two wrappers below) and the gradients are summed
over ranks. The global batch is the one process's, sample for sample:
- every rank draws the same shuffle and mixup (same seeded generators);
- mixup mixes the whole global batch, so the reversed-batch partner is the
  global one, and hands each rank its rows (`GlobalBatchMixup(..., rows)`);
- dropout draws its mask for the global batch and keeps the rank's rows
  (`GlobalBatchDropout`, told the rows by `with global_batch(model, rows, n)`);
- a rank's loss (a mean over its rows) is weighted by its share of the global
  batch, so the summed gradient is the gradient of the global mean, uneven last
  batches included.
So the weights equal one process's up to float summation order. Exception:
`train.mofe.training: joint` routes a rank's samples to experts by group, and
an expert's dropout then sees rows that are not a slice of the global batch:
it draws its own mask (same distribution, not the same mask).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def processes(gpus: int, requested: int | None) -> int:
    """How many training processes on this machine: `requested` (`train.processes`) if set, else
    `gpus` (`train.gpus`) where CUDA is available, else 1."""
    if requested:
        return requested
    return (gpus or 1) if torch.cuda.is_available() else 1


def launch(n: int, module: str, args: list[str]) -> None:
    """Run `python -m <module> <args>` in `n` processes under torchrun; returns when all have finished.

    The worker is a module entry point (the train stage's `__main__`), so this module imports no stage."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    log.info("%s: %d data-parallel processes (torchrun, %s)", module, n, backend)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", module, *args]
    done = subprocess.run(cmd)
    if done.returncode:
        raise RuntimeError(f"data-parallel training failed (torchrun exit code {done.returncode}; "
                           "the workers' errors are above)")


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (size 1: the one process, on the CPU)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of `n` (part sizes differ by at most 1)."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks (in one message). A parameter no rank
        used keeps grad None, as it would in one process (AdamW then leaves it alone)."""
        if not self.distributed:
            return
        used = torch.tensor([float(q.grad is not None) for q in params], device=self.device)
        flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in params]
                         + [used])
        dist.all_reduce(flat)
        offset = 0
        for q, was_used in zip(params, flat[-len(params):].tolist(), strict=True):
            q.grad = flat[offset:offset + q.numel()].view_as(q).clone() if was_used else None
            offset += q.numel()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return values
        out = values.to(self.device)
        dist.all_reduce(out)
        return out.cpu()

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's `values` on every rank."""
        if not self.distributed:
            return values
        out = values.to(self.device)
        dist.broadcast(out, 0)
        return out.cpu()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init() -> World:
    """Join the process group when started by torchrun with several processes; else the one process."""
    if not under_torchrun():
        return World()
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return World(rank, size, device)


def shutdown(world: World) -> None:
    if world.distributed:
        dist.destroy_process_group()


class GlobalBatchMixup:
    """(Dynamic-β) mixup of the whole global batch `x`, `labels`; returns the `rows` of this rank.

    Called like the mixup it wraps, with this rank's rows (which it checks); the
    partner of sample i is then sample B-1-i of the global batch, as in one process.
    """

    def __init__(self, mixup, x: torch.Tensor, labels: torch.Tensor, rows: slice, device: torch.device):
        self.mixup, self.x, self.labels, self.rows, self.device = mixup, x, labels, rows, device

    def __call__(self, x, targets, labels=None, generator=None):
        rows = self.rows
        if len(x) != rows.stop - rows.start:
            raise ValueError(f"GlobalBatchMixup: {len(x)} rows, but this rank holds {rows} of the batch")
        mixed_x, mixed_t, lam = self.mixup(self.x, self.labels, self.labels, generator)
        return mixed_x[rows].to(self.device), mixed_t[rows].to(self.device), lam[rows].to(self.device)


class GlobalBatchDropout(nn.Module):
    """nn.Dropout whose mask is this rank's rows of the mask one process draws for the global batch
    (same draws from the same generator: F.dropout on the CPU is x * bernoulli(1 - p) / (1 - p)).

    Which rows: those given to `global_batch(model, rows, batch_size)` for the forward passes
    inside that block; outside one (validation, routed subsets) it is a plain dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.rows: slice | None = None
        self.batch_size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = self.rows
        if rows is None or len(x) != rows.stop - rows.start:  # not this rank's rows (joint: routed subsets)
            return nn.functional.dropout(x, self.p, True)
        noise = x.new_empty((self.batch_size, *x.shape[1:])).bernoulli_(1 - self.p)[rows]
        return x * noise.div_(1 - self.p)


def use_global_batch_dropout(model: nn.Module) -> nn.Module:
    """Replace every nn.Dropout of `model` by a GlobalBatchDropout (no weights change)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout):
                setattr(module, name, GlobalBatchDropout(child.p))
    return model


@contextmanager
def global_batch(model: nn.Module, rows: slice, batch_size: int) -> Iterator[None]:
    """Inside the block, `model`'s GlobalBatchDropouts keep `rows` of a global batch of `batch_size`."""
    layers = [m for m in model.modules() if isinstance(m, GlobalBatchDropout)]
    for m in layers:
        m.rows, m.batch_size = rows, batch_size
    try:
        yield
    finally:
        for m in layers:
            m.rows, m.batch_size = None, 0
