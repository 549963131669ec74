"""MIMIC distillation: a fresh student learns the teacher's behaviour on clean data only.

    L = NT-Xent(g_S(f_S(x1)), g_S(f_S(x2)))           (contrastive)
      + sum_l beta_l * AT(h_l^S(x1), h_l^T(x1))          (MI-weighted attention transfer)
      + lambda_clone * (-mean cos(f_S(x1), f_T(x1)))     (clone)

The teacher is frozen (eval, requires_grad False, no_grad) and runs once per step on x1; the
student runs once on [x1; x2]; stage outputs come from forward hooks registered once per run
and removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimic.augment import simclr_augment
from mimic.config import DistillConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.encoders import Encoder, ProjectionHead, StageTaps, freeze, make_student
from mimic.losses import clone_loss, nt_xent, weighted_attention
from mimic.runtime import autocast, seed_torch, use_channels_last
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs


@dataclass
class DistillResult:
    student: Encoder
    history: list[dict[str, float]]
    resumed_from: int
    seconds: float
    work_dir: Path


def run_key(teacher_fingerprint: str, data_version: str, cfg: DistillConfig, weights: list[float], seed: int) -> str:
    """Identity of a distillation run (everything but the epoch count, so a run can be extended)."""
    plain = {k: v for k, v in vars(cfg).items() if k != "epochs"}
    blob = json.dumps([teacher_fingerprint, data_version, plain, [round(w, 6) for w in weights], seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    on_epoch_end=None,
) -> DistillResult:
    """Train a student on ``clean`` for ``cfg.epochs`` epochs (resuming from ``work_dir``)."""
    require_size(clean, 2, "clean set")
    batch_size = min(cfg.batch_size, len(clean))
    freeze(teacher).to(device)
    student = make_student(teacher, cfg.student_init, seed).to(device)
    seed_torch(seed, "student-head")
    head = ProjectionHead(student.feature_dim).to(device)
    channels_last = use_channels_last(cfg.memory_format, device, amp_dtype, student)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
    params = list(student.parameters()) + (list(head.parameters()) if cfg.contrastive else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    w = [float(v) for v in weights]
    drop_last = len(clean) >= 2 * batch_size

    t_taps = StageTaps(teacher, teacher.stage_paths())
    s_taps = StageTaps(student, student.stage_paths())

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        meter = MeanMeter()
        for step, idx in enumerate(batches(len(clean), batch_size, g, drop_last=drop_last)):
            if len(idx) < 2:
                continue
            x = to_float(clean.x[idx], device)
            x1, x2 = simclr_augment(x, g, cfg.crop_min_scale), simclr_augment(x, g, cfg.crop_min_scale)
            if channels_last:
                x1 = x1.contiguous(memory_format=torch.channels_last)
                x2 = x2.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                need_teacher = cfg.attention or cfg.clone
                if need_teacher:
                    with torch.no_grad():
                        f_t = teacher(x1)
                        h_t = t_taps.take()
                if cfg.contrastive:
                    f_s = student(torch.cat([x1, x2]))
                    h_s = [h[: len(idx)] for h in s_taps.take()]
                    f_s1, f_s2 = f_s[: len(idx)], f_s[len(idx) :]
                else:
                    f_s1 = student(x1)
                    h_s = s_taps.take()
                parts: dict[str, torch.Tensor] = {}
                if cfg.contrastive:
                    parts["contrastive"] = nt_xent(head(f_s1), head(f_s2), cfg.temperature)
                if cfg.attention:
                    parts["attention"] = weighted_attention(h_s, h_t, w, cfg.attention_p)
                if cfg.clone:
                    parts["clone"] = cfg.lambda_clone * clone_loss(f_s1, f_t)
                loss = torch.stack(list(parts.values())).sum()
            check_finite(loss, "distill", epoch, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            meter.add({"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}, len(idx))
        return meter.means()

    try:
        res: LoopResult = run_epochs(
            "distill",
            modules={"student": student, "head": head},
            optimizer=optimizer,
            epochs=cfg.epochs,
            seed=seed,
            work_dir=work_dir,
            key=key,
            epoch_fn=epoch_fn,
            progress=progress,
            on_epoch_end=on_epoch_end,
        )
    finally:
        t_taps.remove()
        s_taps.remove()
    student.eval().to("cpu", memory_format=torch.contiguous_format)
    teacher.to("cpu", memory_format=torch.contiguous_format)
    return DistillResult(student, res.history, res.resumed_from, res.seconds, work_dir)


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
