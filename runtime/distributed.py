"""torchrun process groups and the two collectives SNCLR needs, on CPU (gloo) and GPU (nccl).

A plain `python train.py` is one process and never creates a process group; every function
here then degenerates to the identity, so the same training step runs everywhere.
"""
import collections
import inspect
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    device: torch.device
    stop: threading.Event = field(default_factory=threading.Event)  # set on SIGTERM or Ctrl-C

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Env:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE and join the process group.

    device: "auto" (CUDA when present), "cuda" or "cpu". GPUs use nccl, one GPU per local
    rank; CPUs use gloo.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"unknown device {device!r}; choose auto, cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Env(rank, world, dev)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) of every rank, concatenated in rank order -> (R B, ...), without gradient: keys
    and neighbor indices carry none (MoCo v3's concat_all_gather). Same shape on every rank."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum x over ranks (a new tensor; x is unchanged)."""
    x = x.clone()
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def all_ok(ok: bool, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank iff `ok` is True on every rank (so a failure on one rank, e.g. rank 0
    failing to save, stops all of them instead of leaving the others waiting in a collective).
    On nccl the flag must live on the GPU: pass the rank's device."""
    if world_size() == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


class OtherRankFailed(Exception):
    """Another rank failed and prints its own error line; this rank stops quietly (status 1)."""


def agree(error, device: torch.device) -> None:
    """Every rank learns whether any rank failed (one all-reduce), so none is left waiting in a
    collective: this rank's own error is raised, or OtherRankFailed where only others failed."""
    if not all_ok(error is None, device):
        raise error or OtherRankFailed()


def on_main(env, action, *args):
    """action(*args) on rank 0 alone (a write, a download); what it returns there, None
    elsewhere. An exception it raises stops every rank (agree), and is raised on rank 0."""
    error = value = None
    if env.main:
        try:
            value = action(*args)
        except Exception as e:  # re-raised on rank 0 once every rank knows
            error = e
    agree(error, env.device)
    return value


class StopAgreement:
    """Whether any rank has received SIGTERM or Ctrl-C, agreed by all ranks after every step, without
    waiting for the GPU. Each poll() all-reduces this rank's flag on the run's own process
    group and returns the agreed flag of an earlier poll, LAG polls back, so every rank stops
    after the same step and the collective overlaps the steps in between:

      gloo (CPU runs): a CPU flag, all-reduced asynchronously, read one poll later (LAG 1);
      nccl (GPU runs): a one-element device flag all-reduced on the nccl stream, copied to
          pinned host memory without blocking, and read two polls later (LAG 2), by which time
          the GPU has long finished it: reading waits for a CUDA event that has almost always
          fired, never for the step in flight.

    No second process group: a gloo group beside nccl would need every
    node's host name to resolve to an address the other nodes reach, and fails or hangs on
    clusters where it resolves to loopback. With one process it is the event itself."""

    def __init__(self, event: threading.Event, device: torch.device = torch.device("cpu")):
        self.event, self.pending = event, collections.deque()
        self.ranked = world_size() > 1
        self.nccl = self.ranked and dist.get_backend() == "nccl"
        self.device = device if self.nccl else torch.device("cpu")
        if self.nccl and self.device.type != "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lag = 2 if self.nccl else 1

    def poll(self) -> bool:
        if not self.ranked:
            return self.event.is_set()
        stopped = self._read() if len(self.pending) >= self.lag else False
        flag = torch.full((1,), float(self.event.is_set()), device=self.device)  # a fill: no copy
        if self.nccl:
            dist.all_reduce(flag)                        # queued on the GPU; the host goes on
            host = torch.empty(1, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self.pending.append((done.synchronize, host))
        else:
            work = dist.all_reduce(flag, async_op=True)
            self.pending.append((work.wait, flag))
        return stopped

    def _read(self) -> bool:
        wait, flag = self.pending.popleft()
        wait()
        return flag.item() > 0  # a host tensor: nothing more to wait for

    def finish(self) -> bool:
        """Wait for the flags in flight (call once the loop is over, on every rank): True when
        any of them was set."""
        stopped = False
        while self.pending:
            stopped = self._read() or stopped
        return stopped


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP for gradient averaging only. No buffer broadcast before each forward: the queue
    (65536 x 256 floats) is identical on every rank by construction, and so are the batch-norm
    statistics (batch_norm.GlobalBatchNorm). Newer PyTorch renamed the option."""
    option = "forward_sync_buffers" if "forward_sync_buffers" in \
        inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   **{option: False})
