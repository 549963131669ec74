"""SimCLR pre-training (NT-Xent), to make the clean encoders of demos, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from mimic.augment import simclr_augment
from mimic.config import PretrainConfig
from mimic.data import ImageSet, batches, require_size, to_float
from mimic.errors import ConfigError
from mimic.encoders import Encoder, EncoderSpec, ProjectionHead, build_encoder
from mimic.losses import nt_xent
from mimic.runtime import autocast, seed_torch
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs


def pretrain_simclr(
    images: ImageSet,
    spec: EncoderSpec,
    cfg: PretrainConfig,
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    init: Encoder | None = None,
) -> tuple[Encoder, LoopResult]:
    """Train ``spec`` with SimCLR on ``images``; returns the encoder (CPU, eval) and the loop result.

    ``init``: start from a copy of this encoder's weights (SimCLR fine-tuning; ``init`` itself is not
    modified) instead of a fresh random encoder. Its architecture must be ``spec``. The projection
    head is always fresh.
    """
    batch_size = min(cfg.batch_size, len(images))
    require_size(images, 2, "pre-training set")
    seed_torch(seed, "pretrain-init")
    encoder = build_encoder(spec)
    if init is not None:
        if init.spec != spec:
            raise ConfigError(f"pretrain: the initial encoder is {init.spec.name}, the run wants {spec.name}")
        encoder.load_state_dict(init.state_dict())
    encoder = encoder.to(device).train()
    encoder.requires_grad_(True)
    head = ProjectionHead(encoder.feature_dim).to(device)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        meter = MeanMeter()
        for step, idx in enumerate(batches(len(images), batch_size, g, drop_last=len(images) >= 2 * batch_size)):
            if len(idx) < 2:
                continue
            x = to_float(images.x[idx], device)
            x1, x2 = simclr_augment(x, g, cfg.crop_min_scale), simclr_augment(x, g, cfg.crop_min_scale)
            with autocast(device, amp_dtype):
                f = encoder(torch.cat([x1, x2]))
                loss = nt_xent(head(f[: len(idx)]), head(f[len(idx) :]), cfg.temperature)
            check_finite(loss, "pretrain", epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            meter.add({"loss": float(loss.detach())}, len(idx))
        return meter.means()

    result = run_epochs(
        "pretrain",
        modules={"encoder": encoder, "head": head},
        optimizer=optimizer,
        epochs=cfg.epochs,
        seed=seed,
        work_dir=work_dir,
        key=key,
        epoch_fn=epoch_fn,
        progress=progress,
    )
    return encoder.eval().cpu(), result
