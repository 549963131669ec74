"""Data-parallel distillation on N processes (``distill.nproc``, ``mimic distill --nproc N``).

One global batch is split across the ranks, never changed by the split:

* **Data.** Every rank draws the epoch's order and each view's augmentation numbers from the run's
  stream (:func:`mimic.runtime.generator`; the same on every rank, as ``DistributedSampler`` seeds
  its shuffle with seed + epoch) and takes its contiguous slice of each global batch
  (:meth:`World.shard`). The ranks see disjoint images and draw no numbers of their own, so no
  per-rank seed is needed and the global batch is exactly the single-process batch.
* **Loss.** The contrastive term all-gathers the projections (differentiably), so its negatives
  are the whole global batch; every rank computes the global NT-Xent. The attention and clone
  terms are per-image means, scaled by ``N * n_rank / n`` so that DDP's gradient average is the
  global mean (also for an uneven last batch).
* **BatchNorm** normalises with each rank's own statistics (the student sees ``2 n / N`` images per
  rank instead of ``2 n``): ``SyncBatchNorm`` only runs on GPUs, and one code path on every device
  keeps CPU (gloo) and CUDA (NCCL) runs the same computation. The running statistics of the ranks
  are averaged before every checkpoint. This is why a DDP run is close to, but not bit-identical
  with, the single-process run of the same global batch (tests/test_ddp.py states the tolerance).
* **Files.** Rank 0 alone writes checkpoints (``last.pt``) and the history; every rank resumes from
  the same checkpoint, so an interrupted DDP run resumes like a single-process one.

Workers are started with ``torch.multiprocessing`` (spawn) and meet through a ``FileStore`` in the
run's work directory (no port to pick); gloo on CPU, NCCL on CUDA (rank r on ``cuda:r``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimic.errors import ConfigError, TrainingDiverged


class _GatherRows(torch.autograd.Function):
    """Every rank's ``t`` (equal shapes), concatenated in rank order along dim 0, with public collectives
    only. Backward: each rank's gradient of the whole result, summed over the ranks, sliced to its own rows
    (a reduce-scatter, as an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        import torch.distributed as dist

        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        ctx.rows = len(t)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        total = grad.clone(memory_format=torch.contiguous_format)  # the incoming gradient is not ours to change
        dist.all_reduce(total)
        lo = dist.get_rank() * ctx.rows
        return total[lo : lo + ctx.rows]


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (``size == 1``: no process group, no communication)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of a global batch of ``n`` that this rank computes (``tensor_split`` sizes)."""
        base, extra = divmod(n, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def all_gather(self, t: Tensor, n: int) -> Tensor:
        """The global batch's rows (this rank's ``t`` = its :meth:`shard` of ``n``), in rank order.

        Differentiable: the backward pass sums every rank's gradient for these rows back to the rank
        that owns them. Uneven shards are zero-padded to the largest for the collective.
        """
        if self.size == 1:
            return t
        sizes = [World(r, self.size).shard(n) for r in range(self.size)]
        width = max(hi - lo for lo, hi in sizes)
        pad = width - len(t)
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
        rows = _GatherRows.apply(t)
        return torch.cat([rows[r * width : r * width + hi - lo] for r, (lo, hi) in enumerate(sizes)])

    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum over the ranks (no-op on one)."""
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def average_buffers_(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean/var) over the ranks."""
        if self.size == 1:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                torch.distributed.all_reduce(buf)
                buf.div_(self.size)


def check_nproc(nproc: int, device: torch.device) -> None:
    if nproc < 1:
        raise ConfigError(f"distill.nproc must be >= 1, got {nproc}")
    if nproc > 1 and device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"distill.nproc={nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if nproc > 1 and device.type not in ("cpu", "cuda"):
        raise ConfigError(f"distill.nproc > 1 runs on cpu (gloo) or cuda (NCCL), not {device.type}")


def _worker(rank: int, nproc: int, store_path: str, device_type: str, threads: int | None, fn: Callable[..., Any],
            args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    from mimic.runtime import set_threads

    set_threads(threads, share=nproc)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, nproc)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=nproc)
    try:
        out = fn(World(rank, nproc), device, *args)
        queue.put(("ok", rank, out if rank == 0 else None))
    except TrainingDiverged as exc:
        queue.put(("diverged", rank, str(exc)))
    except BaseException as exc:  # reported by the parent; the other ranks are stopped by the spawn context
        queue.put(("error", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], args: tuple, *, nproc: int, device: torch.device, work_dir: Path,
              threads: int | None = None) -> Any:
    """Run ``fn(world, device, *args)`` on ``nproc`` spawned ranks; returns rank 0's result.

    ``fn`` and ``args`` must be picklable (module-level function, tensors, modules, dataclasses).
    A :class:`TrainingDiverged` on any rank is raised here with its message; any other failure is
    a :class:`RuntimeError` naming the rank.
    """
    import torch.multiprocessing as mp

    work_dir.mkdir(parents=True, exist_ok=True)
    store = work_dir / "ddp.store"
    store.unlink(missing_ok=True)  # a FileStore file must be fresh for each group
    queue = mp.get_context("spawn").SimpleQueue()
    failed: BaseException | None = None
    try:
        mp.start_processes(_worker, args=(nproc, str(store), device.type, threads, fn, args, queue), nprocs=nproc,
                           join=True, start_method="spawn")
    except Exception as exc:  # ProcessRaisedException / ProcessExitedException: look at what the ranks said
        failed = exc
    finally:
        store.unlink(missing_ok=True)
    reports = []
    while not queue.empty():
        reports.append(queue.get())
    for kind, _rank, msg in reports:
        if kind == "diverged":
            raise TrainingDiverged(msg)
    for kind, rank, msg in reports:
        if kind == "error":
            raise RuntimeError(f"distillation rank {rank} of {nproc} failed: {msg.splitlines()[0]}")
    if failed is not None:
        raise RuntimeError(f"distillation on {nproc} processes failed: {' '.join(str(failed).split())[:300]}")
    return next(out for kind, rank, out in reports if kind == "ok" and rank == 0)
