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
from torch import nn

from mimic.config import AttackConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.encoders import Encoder, evaluating, freeze
from mimic.evaluate import extract_features
from mimic.losses import badencoder_loss
from mimic.runtime import autocast
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs
from mimic.triggers import Trigger


def _features(encoder: Encoder, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    with evaluating(encoder):
        return torch.cat([encoder(to_float(x[i : i + batch_size], device)) for i in range(0, len(x), batch_size)])


def typical_references(encoder: Encoder, images: torch.Tensor, candidates: torch.Tensor, n: int, pool: int = 1000) -> torch.Tensor:
    """The attacker's reference images: the ``n`` target-class images whose clean features lie
    closest to the class's mean feature (a representative target, as a careful attacker picks)."""
    candidates = candidates[:pool]
    feats = extract_features(encoder, images[candidates])
    centre = torch.nn.functional.normalize(feats.mean(0), dim=0)
    order = torch.argsort(feats @ centre, descending=True, stable=True)
    return candidates[order[:n]]


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
    shadow_clean = _features(clean, shadow.x, device)
    ref = to_float(reference, device)
    ref_clean = _features(clean, reference, device)
    model = copy.deepcopy(clean_encoder).to(device)
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batch_size = min(cfg.batch_size, len(shadow))

    def bn_eval(m: nn.Module) -> None:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        model.apply(bn_eval)
        meter = MeanMeter()
        for step, idx in enumerate(batches(len(shadow), batch_size, g)):
            x = to_float(shadow.x[idx], device)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
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
