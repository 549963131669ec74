"""Losses of SimCLR, BadEncoder and MIMIC: pure functions of tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its partner, negatives the other 2N-2.

    Equal to the BadEncoder / MIMIC implementation
    ``-log(exp(s_pos/t) / sum_{k != i} exp(s_ik/t))`` averaged over the 2N anchors.

    The similarities are computed in float32 also under autocast: in bfloat16 (8 mantissa bits)
    a logit near 1/t = 2 is only resolved to ~0.01, which blurs the positive against the negatives.
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    with torch.autocast(z.device.type, enabled=False):
        sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def attention_map(f: Tensor, p: int = 2) -> Tensor:
    """a(F) = sum_c |F_c|^p, flattened over H x W and L2-normalised (Zagoruyko & Komodakis).

    The channel mean is used instead of the sum: it differs by the constant C, which the
    normalisation removes, and stays in range under low precision.
    """
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(f_student: Tensor, f_teacher: Tensor, p: int = 2) -> Tensor:
    """AT(F_S, F_T) = MSE(a(F_S), a(F_T))."""
    return F.mse_loss(attention_map(f_student, p), attention_map(f_teacher, p))


def clone_loss(feat_student: Tensor, feat_teacher: Tensor) -> Tensor:
    """-mean cos(f_S(x), f_T(x))."""
    return -F.cosine_similarity(feat_student.float(), feat_teacher.float(), dim=1).mean()


def weighted_attention(
    stages_student: Sequence[Tensor], stages_teacher: Sequence[Tensor], weights: Sequence[float], p: int = 2
) -> Tensor:
    """sum_l beta_l * AT(h_l^S, h_l^T)."""
    terms = [w * attention_loss(s, t, p) for w, s, t in zip(weights, stages_student, stages_teacher, strict=True)]
    return torch.stack(terms).sum()


def badencoder_loss(
    feat_triggered: Tensor,
    feat_reference: Tensor,
    feat_reference_clean: Tensor,
    feat_shadow: Tensor,
    feat_shadow_clean: Tensor,
    lambda_reference: float = 1.0,
    lambda_clean: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """BadEncoder (Jia et al., 2022): effectiveness + utility terms, all on L2-normalised features.

    * effectiveness: triggered shadow images align with the reference image(s) of the target
      class, ``-mean cos(f(x + t), f(r))`` (each triggered image against the mean reference);
    * reference utility: the backdoored encoder keeps the clean encoder's reference features;
    * clean utility: it keeps the clean encoder's features of clean shadow images.
    """
    ref = F.normalize(feat_reference.float(), dim=1)
    trig = F.normalize(feat_triggered.float(), dim=1)
    effectiveness = -(trig @ ref.t()).mean()
    ref_util = -F.cosine_similarity(feat_reference.float(), feat_reference_clean.float(), dim=1).mean()
    clean_util = -F.cosine_similarity(feat_shadow.float(), feat_shadow_clean.float(), dim=1).mean()
    total = effectiveness + lambda_reference * ref_util + lambda_clean * clean_util
    parts = {
        "effectiveness": float(effectiveness.detach()),
        "reference_utility": float(ref_util.detach()),
        "clean_utility": float(clean_util.detach()),
    }
    return total, parts


def mean_pairwise_cosine(z: Tensor) -> Tensor:
    """S(Z) = mean_{i != j} cos(z_i, z_j), in O(N d) as (||sum_i u_i||^2 - N) / (N (N - 1)), u_i = z_i / ||z_i||.

    The set similarity of DECREE's trigger inversion (mimic.scan) and DRUPE's concentration term.
    """
    n = z.shape[0]
    if n < 2:
        raise ValueError("the mean pairwise similarity needs at least two embeddings")
    u = F.normalize(z.float(), dim=1)
    s = u.sum(0)
    return (s.dot(s) - n) / (n * (n - 1))
