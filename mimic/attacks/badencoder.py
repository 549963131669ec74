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

from mimic.attacks.common import features
from mimic.augment import random_flip
from mimic.config import AttackConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.encoders import Encoder, bn_eval, freeze
from mimic.losses import badencoder_loss
from mimic.runtime import autocast
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs
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
    model = copy.deepcopy(clean_encoder).to(device)
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch_size = min(cfg.batch_size, len(shadow))

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        model.apply(bn_eval)
        meter = MeanMeter()
        for step, idx in enumerate(batches(len(shadow), batch_size, g)):
            x = to_float(shadow.x[idx], device)
            x = random_flip(x, g)
            with autocast(device, amp_dtype):
                f = model(torch.cat([x, trigger.stamp(x, g), ref]))
                n = len(idx)
                f_x, f_t, f_r = f[:n], f[n : 2 * n], f[2 * n :]
                loss, parts = badencoder_loss(
                    f_t, f_r, ref_clean, f_x, shadow_clean[idx.to(shadow_clean.device)], cfg.lambda_reference, cfg.lambda_clean
                )
            check_finite(loss, "attack", epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add({"loss": float(loss.detach()), **parts}, len(idx))
        return meter.means()

    result = run_epochs(
        "badencoder",
        modules={"encoder": model},
        optimizer=optimizer,
        epochs=cfg.epochs,
        seed=seed,
        work_dir=work_dir,
        key=key,
        epoch_fn=epoch_fn,
        progress=progress,
    )
    return freeze(model).cpu(), result
