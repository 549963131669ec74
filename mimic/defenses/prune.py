"""Pruning defences: fine-pruning on the clean set D, and data-free channel-Lipschitz pruning (CLP).

A channel is pruned by zeroing the scale and shift (gamma, beta) of the BatchNorm that produces it,
so the pruned encoder keeps its architecture (any tool can load it) and the channel outputs 0.

**Fine-pruning** (Liu, Dolan-Gavitt & Garg, RAID 2018), for an encoder: backdoor neurons tend to be
dormant on clean inputs. The mean activation of each channel c of the last stage's output,
a_c = mean_{x in D} f_c(x) (the final feature is the spatial mean of that output), ranks the
channels; the ``prune.ratio`` share with the lowest a_c is removed from the stage output (the last
BatchNorm of every residual branch of the stage and of its shortcut, so the residual sums carry
no trace of it). Then the encoder is fine-tuned on D, with the pruned channels held at 0, to
restore its clean features: L = -mean_x cos(m * f(x), m * f_0(x)) (m: the kept channels, f_0 the
frozen teacher; an encoder has no task loss, and SimCLR fine-tuning is the separate ``finetune``
baseline).

**CLP** (Zheng et al., ECCV 2022), no data: for a convolution W followed by a BatchNorm, channel k
of the pair computes x -> gamma_k / sigma_k * (W_k * x) + ..., whose Lipschitz constant is bounded by
UCLC_k = || gamma_k / sigma_k * W_k ||_2 (the largest singular value of W_k as a C_in x (kh kw)
matrix). Backdoor channels are unusually sensitive, so in every layer the channels with
UCLC_k > mean + u * std (u = ``prune.clp_u``, the authors' default 3) are pruned.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimic.data import ImageSet, batches, require_size, to_float
from mimic.defenses.config import PruneConfig
from mimic.encoders import Encoder, evaluating, freeze
from mimic.errors import ConfigError
from mimic.finetune import fine_tune
from mimic.training import LoopResult

Pruned = dict[str, list[int]]  # BatchNorm module path -> pruned channel indices


def zero_channels(model: nn.Module, pruned: Pruned) -> None:
    """gamma = beta = 0 for the listed channels of each BatchNorm (in place, without autograd)."""
    with torch.no_grad():
        for path, channels in pruned.items():
            if channels:
                bn = model.get_submodule(path)
                bn.weight[channels] = 0.0
                bn.bias[channels] = 0.0


def _last_stage_norms(encoder: Encoder) -> list[str]:
    """The BatchNorms whose channels make up the last stage's output: per residual block, the last
    BatchNorm of its branch, and of its shortcut; refused when a shortcut is an identity from
    outside the stage (the channel could not be removed)."""
    stage_path = encoder.stage_paths()[-1]
    stage = encoder.get_submodule(stage_path)
    paths = []
    for i, block in enumerate(stage.children()):
        norms = sorted(n for n, m in block.named_children() if isinstance(m, nn.BatchNorm2d) and n.startswith("bn"))
        if not norms:
            raise ConfigError(f"fine-pruning: {stage_path}[{i}] has no BatchNorm to prune through")
        paths.append(f"{stage_path}.{i}.{max(norms, key=lambda n: int(n[2:] or 0))}")
        down = getattr(block, "downsample", None)
        if down is not None:
            paths.append(f"{stage_path}.{i}.downsample.1")
        elif i == 0:
            raise ConfigError(f"fine-pruning: {stage_path}[0] has an identity shortcut; its channels cannot be pruned")
    return paths


def dormant_channels(encoder: Encoder, clean: ImageSet, ratio: float, device: torch.device) -> list[int]:
    """The ``ratio`` share of final-feature channels with the lowest mean activation on ``clean``."""
    with evaluating(encoder):
        encoder.to(device)
        act = torch.cat([encoder(to_float(clean.x[idx], device)).float().cpu() for idx in batches(len(clean), 512)]).mean(0)
    k = int(round(ratio * len(act)))
    return sorted(torch.argsort(act, stable=True)[:k].tolist())


def fine_prune(
    teacher: Encoder, clean: ImageSet, cfg: PruneConfig, *, seed: int, work_dir: Path, key: str, device: torch.device,
    amp_dtype: torch.dtype | None = None, progress: bool = True,
) -> tuple[Encoder, Pruned, LoopResult]:
    """Fine-pruning (module docstring): the pruned, fine-tuned copy of ``teacher`` (CPU, eval)."""
    require_size(clean, 2, "clean set")
    frozen = freeze(copy.deepcopy(teacher)).to(device)
    channels = dormant_channels(frozen, clean, cfg.ratio, device)
    pruned = {path: channels for path in _last_stage_norms(teacher)}
    keep = torch.ones(teacher.feature_dim, device=device)
    keep[channels] = 0.0

    def step_loss(model: Encoder, x: Tensor, idx: Tensor, epoch: int, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            target = frozen(x).float() * keep
        return -F.cosine_similarity(model(x).float() * keep, target, dim=1).mean(), {}

    def stay_pruned(model: Encoder) -> None:
        zero_channels(model, pruned)

    model, result = fine_tune("fineprune", teacher, clean, step_loss, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
                              seed=seed, work_dir=work_dir, key=key, device=device, amp_dtype=amp_dtype, progress=progress,
                              prepare=stay_pruned, after_step=stay_pruned)
    return model, pruned, result


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """UCLC_k = || gamma_k / sigma_k * W_k ||_2 for every output channel k of a conv-BN pair."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.view(-1, 1, 1, 1)
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)


def clp(teacher: Encoder, u: float) -> tuple[Encoder, Pruned]:
    """CLP (module docstring): a pruned copy of ``teacher`` (CPU, eval); uses no data."""
    model = copy.deepcopy(teacher).cpu()
    pruned: Pruned = {}
    conv: nn.Conv2d | None = None
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                conv = m
            elif isinstance(m, nn.BatchNorm2d) and conv is not None:
                lips = channel_lipschitz(conv, m)
                pruned[name] = torch.nonzero(lips > lips.mean() + u * lips.std()).flatten().tolist()
                conv = None
    zero_channels(model, pruned)
    return freeze(model), pruned
