"""Unlearning with a trigger: fine-tune the teacher on the clean set D so that stamped images keep
their clean embeddings (the mitigation step of SSL-Cleanse, Zheng et al. ECCV 2024, and of
DECREE-style pipelines: invert the trigger, then unlearn it).

With the frozen original teacher f_0, the encoder f being fine-tuned (initialised from f_0), a
trigger t (the scan's inverted trigger, or a given one: any :class:`mimic.triggers.Trigger`) and
a clean batch x from D (horizontal flips):

    L = -mean_x cos(f(x + t), f_0(x))                   unlearning: a stamped image embeds like its clean self
        - lambda_keep * mean_x cos(f(x), f_0(x))        keep the clean embeddings (utility)

Both targets are f_0's clean features, so the backdoor's target never appears in the objective.
BatchNorm stays in eval mode (D is small and half of every batch is stamped). The defender
spends the same data as MIMIC (D, ``data.clean_size`` images) and needs no labels; with an
inverted trigger, how well this works depends on how close the inversion came to the real one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from torch import Tensor

from mimic.data import ImageSet, require_size
from mimic.defenses.config import UnlearnConfig
from mimic.encoders import Encoder, freeze
from mimic.finetune import fine_tune
from mimic.training import LoopResult
from mimic.triggers import Trigger


def unlearn(
    teacher: Encoder,
    clean: ImageSet,
    trigger: Trigger,
    cfg: UnlearnConfig,
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Encoder, LoopResult]:
    """Return the unlearned copy of ``teacher`` (CPU, eval); ``teacher`` itself is not modified."""
    require_size(clean, 2, "clean set")
    frozen = freeze(copy.deepcopy(teacher)).to(device)

    def step_loss(model: Encoder, x: Tensor, idx: Tensor, epoch: int, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            target = frozen(x).float()
        f = model(torch.cat([x, trigger.stamp(x, g)])).float()
        n = len(idx)
        forget = -F.cosine_similarity(f[n:], target, dim=1).mean()
        keep = -F.cosine_similarity(f[:n], target, dim=1).mean()
        return forget + cfg.lambda_keep * keep, {"unlearn": float(forget.detach()), "keep": float(keep.detach())}

    return fine_tune("unlearn", teacher, clean, step_loss, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=seed,
                     work_dir=work_dir, key=key, device=device, amp_dtype=amp_dtype, progress=progress)
