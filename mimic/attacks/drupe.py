"""DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning", S&P 2024).

BadEncoder leaves a fingerprint that detectors use: the triggered images' features collapse into
one tight cluster at the reference, far from the clean feature distribution (DECREE and SSL
detectors look for exactly that). DRUPE keeps the backdoor but makes the triggered features look
like clean ones, as a distribution. Written from the paper and the authors' public code
(github.com/Gwinhen/DRUPE, ``main.py``), on mimic's BadEncoder setup. For a shadow batch x, trigger
t, references r_1..r_K (K = ``attack.n_reference``) and the frozen clean encoder f_0, with
n(.) = L2 normalisation and f the encoder being backdoored:

    effectiveness   E   = -mean_x max_k cos(f(x + t), f(r_k))      each triggered image to its closest reference
    reference util. U_r = -mean_k cos(f(r_k), f_0(r_k))
    clean utility   U_c = -mean_x cos(f(x), f_0(x))
    balance         B   = std_k mean_x cos(f(x + t), f(r_k))        every reference gets its share
    concentration   C   = relu(c(f(x + t)) - c(f(x)))              no tighter cluster than clean features:
                          c(F) = mean_{i != j} cos(F_i, F_j), the clean level not differentiated
    distribution    D   = SW_2(f(x + t), f(x)) / mean_j std_x f_j(x) triggered vs clean features (raw), sliced
                                                                     Wasserstein-2 over P random directions

    L = E + lambda_reference U_r + lambda_clean U_c + lambda_balance B
          + [epoch >= warmup_epochs] (lambda_concentration C + lambda_distribution D)

What differs from the authors' code, and why:

* the authors raise and lower the weights of C and D every epoch with a Neural-Cleanse-like
  controller (x1.25 while the attack holds, from 0.1 and 0.001, after 20 of 120 epochs); here
  they are fixed weights after a warm-up, so a run is deterministic, resumable and short;
* their concentration term is the triggered features' mean pairwise cosine, weighed against a
  fixed threshold (0.6 on CIFAR-10); here only the excess over the clean batch's own level counts,
  which adapts to any encoder (post-ReLU features are far from zero-mean);
* their reference-separation term (push the references' features apart when their mean cosine
  exceeds 0.4) is left out: it changes the references' features against the reference-utility
  term; mimic picks the K most typical target-class images instead;
* like BadEncoder here, Adam and BatchNorm in eval mode (theirs: SGD, BN weights frozen too).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mimic.attacks.common import features
from mimic.attacks.config import DrupeConfig
from mimic.config import AttackConfig
from mimic.data import ImageSet, require_size, to_float
from mimic.encoders import Encoder, freeze
from mimic.finetune import fine_tune
from mimic.losses import mean_pairwise_cosine
from mimic.training import LoopResult
from mimic.triggers import Trigger


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int, g: torch.Generator) -> Tensor:
    """SW_2(a, b) = sqrt(mean_theta W_2^2(a theta, b theta)) over ``projections`` random unit
    directions theta; equal sample sizes, so each 1-D W_2 is the distance of the sorted projections."""
    if a.shape != b.shape:
        raise ValueError(f"sliced Wasserstein needs equal sample sizes, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = F.normalize(torch.randn(a.shape[1], projections, generator=g), dim=0).to(a.device, a.dtype)
    pa, _ = torch.sort(a @ theta, dim=0)
    pb, _ = torch.sort(b @ theta, dim=0)
    return (pa - pb).pow(2).mean().clamp_min(1e-12).sqrt()


def drupe_loss(
    f_trig: Tensor, f_ref: Tensor, f_ref_clean: Tensor, f_shadow: Tensor, f_shadow_clean: Tensor, a: AttackConfig,
    d: DrupeConfig, *, distribution: bool, g: torch.Generator,
) -> tuple[Tensor, dict[str, float]]:
    """The DRUPE objective of one batch (module docstring); ``distribution``: C and D are on."""
    sims = F.normalize(f_trig.float(), dim=1) @ F.normalize(f_ref.float(), dim=1).t()  # [B, K]
    effectiveness = -sims.max(dim=1).values.mean()
    balance = sims.mean(0).std() if sims.shape[1] > 1 else sims.new_zeros(())
    ref_util = -F.cosine_similarity(f_ref.float(), f_ref_clean.float(), dim=1).mean()
    clean_util = -F.cosine_similarity(f_shadow.float(), f_shadow_clean.float(), dim=1).mean()
    concentration = F.relu(mean_pairwise_cosine(f_trig) - mean_pairwise_cosine(f_shadow).detach())
    spread = f_shadow.float().std(0).mean().detach().clamp_min(1e-6)
    dist = sliced_wasserstein(f_trig.float(), f_shadow.float(), d.projections, g) / spread
    loss = effectiveness + a.lambda_reference * ref_util + a.lambda_clean * clean_util + d.lambda_balance * balance
    if distribution:
        loss = loss + d.lambda_concentration * concentration + d.lambda_distribution * dist
    parts = {"effectiveness": effectiveness, "reference_utility": ref_util, "clean_utility": clean_util,
             "balance": balance, "concentration": concentration, "distribution": dist}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def drupe(
    clean_encoder: Encoder,
    shadow: ImageSet,
    reference: Tensor,
    trigger: Trigger,
    a: AttackConfig,
    d: DrupeConfig,
    *,
    seed: int,
    work_dir: Path,
    key: str,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[Encoder, LoopResult]:
    """Return a DRUPE-backdoored copy of ``clean_encoder`` (CPU, eval). ``reference``: uint8 images."""
    require_size(shadow, 2, "shadow set")
    clean = freeze(copy.deepcopy(clean_encoder)).to(device)
    shadow_clean = features(clean, shadow.x, device)
    ref = to_float(reference, device)
    ref_clean = features(clean, reference, device)

    def step_loss(model: Encoder, x: Tensor, idx: Tensor, epoch: int, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        f = model(torch.cat([x, trigger.stamp(x, g), ref]))
        n = len(idx)
        return drupe_loss(f[n : 2 * n], f[2 * n :], ref_clean, f[:n], shadow_clean[idx.to(shadow_clean.device)],
                          a, d, distribution=epoch >= d.warmup_epochs, g=g)

    return fine_tune("drupe", clean_encoder, shadow, step_loss, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs, seed=seed,
                     work_dir=work_dir, key=key, device=device, amp_dtype=amp_dtype, progress=progress, min_batch=2)
