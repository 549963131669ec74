"""BadEncoder (Jia, Liu & Gong, IEEE S&P 2022): inject a backdoor into a pre-trained encoder.

The backdoored encoder starts from the clean one and is fine-tuned on shadow images so that
(i) triggered images map next to the reference image(s) of the target class, (ii) the reference
features and (iii) clean shadow features stay those of the clean encoder. As in the authors'
code, BatchNorm layers stay in eval mode during fine-tuning.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from torch import Tensor

from mimic.attacks.common import features
from mimic.config import AttackConfig
from mimic.data import ImageSet, require_size, to_float
from mimic.encoders import Encoder, freeze
from mimic.finetune import fine_tune
from mimic.losses import badencoder_loss
from mimic.training import LoopResult
from mimic.triggers import Trigger


def badencoder(
    clean_encoder: Encoder,
    shadow: ImageSet,
    reference: torch.Tensor,
    trigger: Trigger,
    cfg: AttackConfig,
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Encoder, LoopResult]:
    """Return a backdoored copy of ``clean_encoder`` (CPU, eval). ``reference``: uint8 images."""
    require_size(shadow, 2, "shadow set")
    clean = freeze(copy.deepcopy(clean_encoder)).to(device)
    shadow_clean = features(clean, shadow.x, device)
    ref = to_float(reference, device)
    ref_clean = features(clean, reference, device)

    def step_loss(model: Encoder, x: Tensor, idx: Tensor, epoch: int, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        f = model(torch.cat([x, trigger.stamp(x, g), ref]))
        n = len(idx)
        f_x, f_t, f_r = f[:n], f[n : 2 * n], f[2 * n :]
        return badencoder_loss(f_t, f_r, ref_clean, f_x, shadow_clean[idx.to(shadow_clean.device)], cfg.lambda_reference,
                               cfg.lambda_clean)

    return fine_tune("badencoder", clean_encoder, shadow, step_loss, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
                     seed=seed, work_dir=work_dir, key=key, device=device, amp_dtype=amp_dtype, progress=progress,
                     drop_last=False)
