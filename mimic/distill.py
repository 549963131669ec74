"""MIMIC distillation: a fresh student learns the teacher's behaviour on clean data only.

    L = NT-Xent(g_S(f_S(x1)), g_S(f_S(x2)))           (contrastive)
      + sum_l beta_l * AT(h_l^S(x1), h_l^T(x1))          (MI-weighted attention transfer)
      + lambda_clone * (-mean cos(f_S(x1), f_T(x1)))     (clone)

The teacher is frozen (eval, requires_grad False, no_grad) and runs once per step on x1; the
student runs once on [x1; x2]; stage outputs come from forward hooks registered once per run
and removed afterwards.

:func:`distill_step` is the one training step: ``distill()`` (hence ``mimic distill``, the audit,
the flow and DVC), every DDP rank (:mod:`mimic.distributed`) and ``benchmarks/bench_distill.py``
call it. It performs no host synchronisation: losses stay on the device until the epoch's end
(:class:`mimic.training.LossLog`). Speed knobs (``distill.memory_format``, ``distill.compile``,
``precision``) are decided in :mod:`mimic.runtime`; docs/performance.md says what each buys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mimic.augment import ViewDraw, apply_view, draw_view
from mimic.config import DistillConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.distributed import World, check_nproc, run_ranks
from mimic.encoders import Encoder, ProjectionHead, StageTaps, freeze, make_student
from mimic.losses import clone_loss, nt_xent, weighted_attention
from mimic.runtime import autocast, seed_torch, use_channels_last
from mimic.training import LossLog, LoopResult, run_epochs


@dataclass
class DistillResult:
    student: Encoder
    history: list[dict[str, float]]
    resumed_from: int
    seconds: float
    work_dir: Path


def attention_factor(end: float, epoch: int, epochs: int) -> float:
    """Multiplier of every beta_l in ``epoch`` (0-based) of ``epochs``: a half cosine from 1 at the first
    epoch to ``end`` at the last, ``end + (1 - end) (1 + cos(pi e / (E - 1))) / 2``; ``end = 1`` is constant.
    """
    if end == 1.0 or epochs <= 1:
        return 1.0
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * epoch / (epochs - 1)))


class StudentAndHead(nn.Module):
    """The trained modules as one (what DDP wraps): ``f = f_S(x)``; ``z_i = g_S(f_S(x_i))`` per view."""

    def __init__(self, student: Encoder, head: ProjectionHead | None) -> None:
        super().__init__()
        self.student, self.head = student, head

    def forward(self, x: Tensor, n: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        f = self.student(x)
        if self.head is None:
            return f, None, None
        return f, self.head(f[:n]), self.head(f[n:])  # one BatchNorm batch per view, as SimCLR


class Clock:
    """Per-phase wall time of :func:`distill_step` (benchmarks only; production passes none).

    ``lap(name)`` charges the time since the previous lap to ``name``; on CUDA it synchronises first,
    which is exactly the host sync production runs avoid. ``steps`` holds, per step, the images,
    the seconds and the seconds per phase.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[tuple[int, float, dict[str, float]]] = []
        self._phases: dict[str, float] = {}
        self._t = self._t0 = time.perf_counter()

    def start(self) -> None:
        self._sync()
        self._t = self._t0 = time.perf_counter()
        self._phases = {}

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self._phases[name] = self._phases.get(name, 0.0) + now - self._t
        self._t = now

    def step_done(self, images: int) -> None:
        self.lap("other")  # the loss log and loop overhead
        self.steps.append((images, self._t - self._t0, self._phases))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Distiller:
    """Everything a distillation step needs, built once per run by :func:`prepare`."""

    cfg: DistillConfig
    teacher: Encoder
    student: Encoder
    head: ProjectionHead
    model: nn.Module  # StudentAndHead, DDP-wrapped and/or compiled
    teacher_fn: nn.Module  # the teacher, compiled or not
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    weights: list[float]
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    world: World = field(default_factory=World)
    t_taps: StageTaps | None = None
    s_taps: StageTaps | None = None
    attention_scale: float = 1.0  # this epoch's attention_factor (set by run_epoch)

    @property
    def names(self) -> list[str]:
        c = self.cfg
        return ["loss"] + [k for k, on in (("contrastive", c.contrastive), ("attention", c.attention), ("clone", c.clone)) if on]

    def close(self) -> None:
        for taps in (self.t_taps, self.s_taps):
            if taps is not None:
                taps.remove()


def prepare(teacher: Encoder, cfg: DistillConfig, weights, *, seed: int, device: torch.device,
            amp: torch.dtype | None = None, world: World | None = None) -> Distiller:
    """Freeze the teacher, build the empty student and head, the optimizer and the stage taps."""
    world = world or World()
    freeze(teacher).to(device)
    student = make_student(teacher, cfg.student_init, seed).to(device)
    seed_torch(seed, "student-head")
    head = ProjectionHead(student.feature_dim).to(device)
    cl = use_channels_last(cfg.memory_format, device, amp, student)
    if cl:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    params = list(student.parameters()) + (list(head.parameters()) if cfg.contrastive else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    model: nn.Module = StudentAndHead(student, head if cfg.contrastive else None)
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)  # buffers: averaged per epoch (train)
    teacher_fn: nn.Module = teacher
    if cfg.compile:
        model, teacher_fn = torch.compile(model), torch.compile(teacher)
    d = Distiller(cfg, teacher, student, head, model, teacher_fn, optimizer, scaler, [float(v) for v in weights],
                  device, amp, cl, world)
    d.t_taps = StageTaps(teacher, teacher.stage_paths())
    d.s_taps = StageTaps(student, student.stage_paths())
    return d


def distill_step(d: Distiller, images: Tensor, views: tuple[ViewDraw, ViewDraw], n_global: int,
                 clock: Clock | None = None) -> Tensor:
    """One optimiser step on this rank's ``images`` (uint8, N x 3 x H x W) with the drawn ``views``.

    Returns the detached losses ``[total, *parts]`` (on the device) as estimates for the global batch
    of ``n_global`` images: the contrastive term is the global one; the per-image terms are this
    rank's means scaled by ``n / n_global`` (so they sum over the ranks to the global means).
    """
    cfg, n, world = d.cfg, len(images), d.world
    x = to_float(images, d.device)
    if clock:
        clock.lap("data")
    x1, x2 = apply_view(x, views[0]), apply_view(x, views[1])
    if d.channels_last:
        x1 = x1.contiguous(memory_format=torch.channels_last)
        x2 = x2.contiguous(memory_format=torch.channels_last)
    if clock:
        clock.lap("augment")
    with autocast(d.device, d.amp):
        if cfg.attention or cfg.clone:
            with torch.no_grad():
                f_t = d.teacher_fn(x1)
                h_t = d.t_taps.take()
        if clock:
            clock.lap("teacher")
        f_s, z1, z2 = d.model(torch.cat([x1, x2]) if cfg.contrastive else x1, n)
        h_s = [h[:n] for h in d.s_taps.take()] if cfg.contrastive else d.s_taps.take()
        f_s1 = f_s[:n]
        share = n / n_global  # this rank's share of the global batch
        local = world.size * share  # scale of the per-image terms: DDP averages the ranks' gradients
        parts: dict[str, Tensor] = {}
        report: list[Tensor] = []
        if cfg.contrastive:
            parts["contrastive"] = nt_xent(world.all_gather(z1, n_global), world.all_gather(z2, n_global), cfg.temperature)
            report.append(parts["contrastive"] / world.size if world.size > 1 else parts["contrastive"])
        if cfg.attention:
            weights = d.weights if d.attention_scale == 1.0 else [w * d.attention_scale for w in d.weights]
            parts["attention"] = weighted_attention(h_s, h_t, weights, cfg.attention_p)
        if cfg.clone:
            parts["clone"] = cfg.lambda_clone * clone_loss(f_s1, f_t)
        for k in ("attention", "clone"):
            if k in parts:
                report.append(parts[k] * share if share != 1.0 else parts[k])
                if local != 1.0:
                    parts[k] = parts[k] * local
        loss = torch.stack(list(parts.values())).sum()
    d.optimizer.zero_grad(set_to_none=True)
    d.scaler.scale(loss).backward()
    if clock:
        clock.lap("student")
    d.scaler.step(d.optimizer)
    d.scaler.update()
    if clock:
        clock.lap("optimizer")
    total = loss / world.size if world.size > 1 else loss
    return torch.stack([total.detach(), *[r.detach() for r in report]])


def run_epoch(d: Distiller, clean: ImageSet, epoch: int, g: torch.Generator, *, clock: Clock | None = None,
              max_steps: int | None = None) -> dict[str, float]:
    """One epoch of :func:`distill_step` over ``clean`` (this rank's share of each global batch).

    Every rank draws the same order and views from ``g`` and computes its rows (mimic.distributed).
    ``clock``/``max_steps``: for the benchmark, which times exactly this loop.
    """
    cfg, world = d.cfg, d.world
    batch_size = min(cfg.batch_size, len(clean))
    drop_last = len(clean) >= 2 * batch_size
    d.attention_scale = attention_factor(cfg.attention_end, epoch, cfg.epochs)
    log = LossLog(d.names, "distill", epoch, immediate=d.device.type == "cpu" and world.size == 1)
    for step, idx in enumerate(batches(len(clean), batch_size, g, drop_last=drop_last)):
        if max_steps is not None and step >= max_steps:
            break
        if clock:
            clock.start()
        n = len(idx)
        lo, hi = world.shard(n)
        if hi - lo < 2:  # a BatchNorm batch needs 2 images on every rank
            continue
        views = draw_view(n, g, cfg.crop_min_scale), draw_view(n, g, cfg.crop_min_scale)
        if world.size > 1:
            views = views[0].rows(lo, hi), views[1].rows(lo, hi)
        log.add(distill_step(d, clean.x[idx[lo:hi]], views, n, clock), n)
        if clock:
            clock.step_done(n)
    means = log.means(world)
    world.average_buffers_(d.student)
    world.average_buffers_(d.head)
    return means


def train(d: Distiller, clean: ImageSet, *, seed: int, work_dir: Path, key: str, progress: bool = True,
          on_epoch_end=None) -> LoopResult:
    """The epoch loop around :func:`run_epoch` (checkpoints and resume: :func:`mimic.training.run_epochs`)."""
    return run_epochs("distill", modules={"student": d.student, "head": d.head}, optimizer=d.optimizer,
                      epochs=d.cfg.epochs, seed=seed, work_dir=work_dir, key=key,
                      epoch_fn=lambda epoch, g: run_epoch(d, clean, epoch, g), progress=progress,
                      on_epoch_end=on_epoch_end, writer=d.world.main)


def _rank_main(world: World, device: torch.device, teacher: Encoder, clean: ImageSet, cfg: DistillConfig, weights,
               seed: int, work_dir: Path, key: str, amp: torch.dtype | None, progress: bool) -> dict:
    d = prepare(teacher, cfg, weights, seed=seed, device=device, amp=amp, world=world)
    try:
        res = train(d, clean, seed=seed, work_dir=work_dir, key=key, progress=progress)
    finally:
        d.close()
    return {"history": res.history, "resumed_from": res.resumed_from, "seconds": res.seconds}


def distill(
    teacher: Encoder,
    clean: ImageSet,
    cfg: DistillConfig,
    weights: list[float] | tuple[float, ...],
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> DistillResult:
    """Train a student on ``clean`` for ``cfg.epochs`` epochs (resuming from ``work_dir``).

    ``cfg.nproc > 1``: on that many DDP ranks (:mod:`mimic.distributed`); ``on_epoch_end`` is then
    called for each new epoch once the ranks are done.
    """
    require_size(clean, 2, "clean set")
    check_nproc(cfg.nproc, device)
    if cfg.nproc > 1:
        return _distill_ddp(teacher, clean, cfg, weights, seed=seed, work_dir=work_dir, key=key, device=device,
                            amp_dtype=amp_dtype, progress=progress, on_epoch_end=on_epoch_end)
    d = prepare(teacher, cfg, weights, seed=seed, device=device, amp=amp_dtype)
    try:
        res = train(d, clean, seed=seed, work_dir=work_dir, key=key, progress=progress, on_epoch_end=on_epoch_end)
    finally:
        d.close()
    student = d.student
    student.eval().to("cpu", memory_format=torch.contiguous_format)
    teacher.to("cpu", memory_format=torch.contiguous_format)
    return DistillResult(student, res.history, res.resumed_from, res.seconds, work_dir)


def _distill_ddp(teacher: Encoder, clean: ImageSet, cfg: DistillConfig, weights, *, seed: int, work_dir: Path, key: str,
                 device: torch.device, amp_dtype, progress: bool, on_epoch_end) -> DistillResult:
    from mimic.checkpoints import load_state

    teacher = teacher.to("cpu", memory_format=torch.contiguous_format)
    out = run_ranks(_rank_main, (teacher, clean, cfg, list(weights), seed, work_dir, key, amp_dtype, progress),
                    nproc=cfg.nproc, device=device, work_dir=work_dir)
    student = make_student(teacher, cfg.student_init, seed)
    student.load_state_dict(load_state(work_dir / "last.pt")["modules"]["student"], strict=True)
    if on_epoch_end is not None:
        for h in out["history"][out["resumed_from"]:]:
            on_epoch_end(int(h["epoch"]), {k: v for k, v in h.items() if k != "epoch"})
    return DistillResult(student.eval(), out["history"], out["resumed_from"], out["seconds"], work_dir)


def plot_losses(history: list[dict[str, float]], path: str, title: str = "Distillation losses") -> None:
    """Per-epoch loss curves (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    for key in sorted({k for h in history for k in h} - {"epoch"}):
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def parameters_unchanged(a: nn.Module, b_state: dict[str, torch.Tensor]) -> bool:
    """True when every tensor of ``a.state_dict()`` equals ``b_state`` bit for bit."""
    sa = a.state_dict()
    return sa.keys() == b_state.keys() and all(torch.equal(sa[k].cpu(), b_state[k].cpu()) for k in sa)
