"""Fine-tuning a copy of an encoder: the loop that attacks (BadEncoder, DRUPE) and the fine-tuning
defences (unlearning, fine-pruning) share.

Every one of them starts from a trained encoder, keeps BatchNorm in eval mode (as BadEncoder's
code does), draws batches and a horizontal flip from the epoch's generator, and minimises its own
loss with Adam under ``run_epochs`` (checkpoint + resume). Only the loss differs, so that is all a
caller writes: ``step_loss(model, x, idx, epoch, g) -> (loss, parts)``, run under autocast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mimic.augment import random_flip
from mimic.data import ImageSet, batches, to_float
from mimic.encoders import Encoder, bn_eval, freeze
from mimic.runtime import autocast
from mimic.training import LoopResult, MeanMeter, check_finite, run_epochs

StepLoss = Callable[[Encoder, Tensor, Tensor, int, torch.Generator], tuple[Tensor, dict[str, float]]]


def fine_tune(
    name: str,
    start: Encoder,
    images: ImageSet,
    step_loss: StepLoss,
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    drop_last: bool = True,
    min_batch: int = 1,
    prepare: Callable[[Encoder], None] | None = None,
    after_step: Callable[[Encoder], None] | None = None,
) -> tuple[Encoder, LoopResult]:
    """Fine-tune a copy of ``start`` (``start`` is not modified) on ``images``; the copy (CPU, eval).

    ``drop_last``: drop the last short batch when there are at least two full ones (BadEncoder keeps
    it, as its published numbers do); batches under ``min_batch`` images are skipped (losses over
    pairs need two). ``prepare`` edits the copy before training (fine-pruning zeroes channels);
    ``after_step`` runs after every optimiser step (pruned channels stay zero).
    """
    model = copy.deepcopy(start).to(device)
    if prepare is not None:
        prepare(model)
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    bs = min(batch_size, len(images))

    def epoch_fn(epoch: int, g: torch.Generator) -> dict[str, float]:
        model.apply(bn_eval)
        meter = MeanMeter()
        for step, idx in enumerate(batches(len(images), bs, g, drop_last=drop_last and len(images) >= 2 * bs)):
            if len(idx) < min_batch:
                continue
            x = random_flip(to_float(images.x[idx], device), g)
            with autocast(device, amp_dtype):
                loss, parts = step_loss(model, x, idx, epoch, g)
            check_finite(loss, name, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            meter.add({"loss": float(loss.detach()), **parts}, len(idx))
        return meter.means()

    result = run_epochs(name, modules={"encoder": model}, optimizer=optimizer, epochs=epochs, seed=seed,
                        work_dir=work_dir, key=key, epoch_fn=epoch_fn, progress=progress)
    return freeze(model).cpu(), result
