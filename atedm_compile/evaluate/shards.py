"""Splitting the work over processes with ``torch.distributed``, as ``torchrun`` starts them.

Only the environment ``torchrun`` sets is read (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, and the
rendezvous it set up), so one node or many is the same code. Without it, one process does it all;
several processes that SLURM started without it are refused (``check_launch``). Several ranks on
the CPU run one thread each unless ``OMP_NUM_THREADS`` says otherwise, as under ``torchrun``: the
sums of a matrix product split over threads round by the thread count, and every launcher must
give the same images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import devices

# Rank 0 may solve FLOPs budgets (minutes on SD-XL) while the others wait for the answer.
TIMEOUT = timedelta(minutes=60)


@dataclass
class Shard:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    def mine(self, count: int) -> list[int]:
        """This process's share of ``count`` work items: every ``world``-th, from ``rank``."""
        return list(range(self.rank, count, self.world))

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def from_rank0(self, compute, share: bool = True):
        """``compute()`` on rank 0, its result on every rank (``share=False``: on rank 0 only,
        None elsewhere). An error there is raised on every rank (as a ValueError elsewhere), so
        that no rank waits for a result that never comes."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = compute()
            except Exception as caught:  # noqa: BLE001 - sent on to the other ranks, then raised
                error = caught
        if self.world > 1:
            box = [(result if share else None, None if error is None else f"{type(error).__name__}: {error}")]
            dist.broadcast_object_list(box, src=0)
            shared, message = box[0]
            result = result if self.rank == 0 else shared
            if self.rank != 0 and message is not None:
                raise ValueError(f"rank 0 failed: {message}")
        if error is not None:
            raise error
        return result


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK``) where CUDA is available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return devices.resolve_device(f"cuda:{local_rank}" if device == "cuda" else device)
    except ValueError as error:
        raise ValueError(f"--device {device!r}: {error}") from None


def check_launch(environ=os.environ) -> None:
    """ValueError where SLURM started several tasks of this command without torchrun (no
    ``RANK`` / ``WORLD_SIZE``): each would do the whole job into the same output."""
    # srun sets SLURM_STEP_NUM_TASKS for its step; a batch script's own process, one task of a job
    # of several (SLURM_NTASKS), is no such step.
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    if not tasks.isdigit() or int(tasks) < 2 or "RANK" in environ or "WORLD_SIZE" in environ:
        return
    raise ValueError(f"SLURM started {tasks} tasks of this command (SLURM_STEP_NUM_TASKS={tasks}) without "
                     f"torchrun: no RANK or WORLD_SIZE, so each would do the whole job into the same --out. Run one "
                     f"task per node that starts torchrun (srun --ntasks-per-node 1 torchrun ...), set RANK, "
                     f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's variables, or run one task "
                     f"(srun --ntasks 1); see the README's Clusters")


def start(device: str = "auto") -> Shard:
    """Join the process group ``torchrun`` describes (gloo on the CPU, NCCL on GPUs), or run alone."""
    check_launch()
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size(), device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard(0, 1, device)
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1; SLURM's env:// launch sets nothing
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size(), device, owns_group=True)


def finish(shard: Shard) -> None:
    if shard.owns_group:
        dist.destroy_process_group()
