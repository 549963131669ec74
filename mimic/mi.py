"""Per-stage mutual information between stage feature maps and the final representation.

I_l = MI(h_l(x), z(x)) over the clean set, estimated with the Donsker-Varadhan lower bound

    I_l ~= mean_x T_l(h_l(x), z(x)) - log mean_x exp T_l(h_l(x), z(x'))

(x' a shuffled partner), or with InfoNCE. Unlike the authors' code, the network runs over the
data once: every stage's (pooled) features and z are cached, and all critics train from that
cache together. Negative or NaN estimates count as 0; the MIMIC weights are
beta_l = base + scale * I_l / sum_k I_k (``mi.mapping: share``, the paper's) or with a sharper
softmax share (``mi.mapping: softmax``, :func:`mi_weights`), falling back to uniform weights when
every I_l is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimic.data import ImageSet, batches, to_float
from mimic.encoders import Encoder, StageTaps, evaluating
from mimic.runtime import generator, seed_torch


@dataclass(frozen=True)
class StageFeatures:
    stages: tuple[str, ...]
    h: tuple[Tensor, ...]  # per stage: [N, C * pool * pool], float32, CPU
    z: Tensor  # [N, d], L2-normalised


@dataclass(frozen=True)
class MIResult:
    stages: tuple[str, ...]
    mi: tuple[float, ...]  # nats, clipped at 0
    raw: tuple[float, ...]  # the estimates before clipping
    weights: tuple[float, ...]
    estimator: str

    def to_dict(self) -> dict:
        return {
            "estimator": self.estimator,
            "stages": list(self.stages),
            "mi": dict(zip(self.stages, self.mi)),
            "raw": {s: (r if math.isfinite(r) else None) for s, r in zip(self.stages, self.raw)},  # JSON has no NaN
            "weights": dict(zip(self.stages, self.weights)),
        }


def extract_stage_features(
    encoder: Encoder, images: ImageSet, pool: int = 2, batch_size: int = 256, device: torch.device | str = "cpu"
) -> StageFeatures:
    """One pass over ``images``: pooled stage maps and the normalised final feature."""
    paths = encoder.stage_paths()
    hs: list[list[Tensor]] = [[] for _ in paths]
    zs: list[Tensor] = []
    with StageTaps(encoder, paths) as taps, evaluating(encoder):
        for idx in batches(len(images), batch_size):
            z = encoder(to_float(images.x[idx], device))
            for i, h in enumerate(taps.take()):
                hs[i].append(F.adaptive_avg_pool2d(h.float(), pool).flatten(1).cpu())
            zs.append(F.normalize(z.float(), dim=1).cpu())
    names = tuple(p.rsplit(".", 1)[-1] for p in paths)
    return StageFeatures(names, tuple(torch.cat(h) for h in hs), torch.cat(zs))


class ConcatCritic(nn.Module):
    """T(h, z) = MLP([h ++ z]) -> scalar."""

    def __init__(self, dim_h: int, dim_z: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim_h + dim_z, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([h, z], dim=1)).squeeze(1)


class SeparableCritic(nn.Module):
    """T(h, z) = <g(h), k(z)>: scores for all pairs of a batch at once (for InfoNCE)."""

    def __init__(self, dim_h: int, dim_z: int, hidden: int = 256, embed: int = 64) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(dim_h, hidden), nn.ReLU(), nn.Linear(hidden, embed))
        self.k = nn.Sequential(nn.Linear(dim_z, hidden), nn.ReLU(), nn.Linear(hidden, embed))

    def scores(self, h: Tensor, z: Tensor) -> Tensor:
        return self.g(h) @ self.k(z).t()


def dv_bound(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Donsker-Varadhan: mean T(joint) - log mean exp T(marginal)."""
    return t_joint.mean() - (torch.logsumexp(t_marginal, dim=0) - math.log(t_marginal.numel()))


def infonce_bound(scores: Tensor) -> Tensor:
    """InfoNCE: mean_i [s_ii - logsumexp_j s_ij] + log B (bounded by log B)."""
    return (scores.diag() - torch.logsumexp(scores, dim=1)).mean() + math.log(scores.shape[0])


def _standardise(x: Tensor) -> Tensor:
    # An invertible per-dimension map: leaves MI unchanged, conditions the critic.
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def estimate_mi(
    hs: tuple[Tensor, ...] | list[Tensor],
    z: Tensor,
    *,
    estimator: str = "dv",
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int = 256,
    seed: int = 0,
) -> list[float]:
    """Estimate MI(h_l, z) for every l; all critics train together from the cached features."""
    seed_torch(seed, "mi-critics")
    hs = [_standardise(h.float()) for h in hs]
    z = _standardise(z.float())
    n = z.shape[0]
    batch_size = min(batch_size, n)
    if estimator == "dv":
        critics = nn.ModuleList(ConcatCritic(h.shape[1], z.shape[1], hidden) for h in hs)
    elif estimator == "infonce":
        critics = nn.ModuleList(SeparableCritic(h.shape[1], z.shape[1], hidden) for h in hs)
    else:
        raise ValueError(f"unknown MI estimator {estimator!r}")
    opt = torch.optim.Adam(critics.parameters(), lr=lr)

    def bound(critic: nn.Module, h: Tensor, zb: Tensor, g: torch.Generator) -> Tensor:
        if estimator == "dv":
            perm = torch.randperm(h.shape[0], generator=g)
            return dv_bound(critic(h, zb), critic(h, zb[perm]))
        return infonce_bound(critic.scores(h, zb))

    critics.train()
    for epoch in range(epochs):
        g = generator(seed, "mi", epoch)
        for idx in batches(n, batch_size, g, drop_last=True):
            loss = -sum(bound(c, h[idx], z[idx], g) for c, h in zip(critics, hs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    critics.eval()
    out = []
    g = generator(seed, "mi-eval")
    with torch.no_grad():
        for c, h in zip(critics, hs):
            vals = [float(bound(c, h[idx], z[idx], g)) for idx in batches(n, batch_size, g, drop_last=True)]
            out.append(sum(vals) / len(vals))
    return out


def mi_weights(mi: list[float] | tuple[float, ...], base: float = 1000.0, scale: float = 10000.0,
               mapping: str = "share", temperature: float = 1.0) -> list[float]:
    """beta_l = base + scale * s_l, with the stage shares s_l (summing to 1) from the MI estimates:

    * ``share`` (the paper): s_l = I_l / sum_k I_k;
    * ``softmax``: s_l = exp(I_l / T) / sum_k exp(I_k / T) with a temperature T in nats. MI
      estimates of different stages are close (within ~1 nat), so ``share`` leaves the weights
      within ~15% of uniform; a small T makes the stage with the most MI dominate (T -> inf:
      uniform, T -> 0: all of ``scale`` on the top stage).

    Both spend the same total, L * base + scale. Negative/NaN I count as 0; every I_l = 0 gives
    uniform weights.
    """
    clean = [v if (v is not None and math.isfinite(v) and v > 0) else 0.0 for v in mi]
    total = sum(clean)
    if total <= 0:
        return [base + scale / len(clean)] * len(clean)
    if mapping == "share":
        shares = [v / total for v in clean]
    elif mapping == "softmax":
        shares = torch.softmax(torch.tensor(clean, dtype=torch.float64) / temperature, dim=0).tolist()
    else:
        raise ValueError(f"unknown MI mapping {mapping!r}")
    return [base + scale * s for s in shares]


def uniform_weights(n: int, base: float = 1000.0, scale: float = 10000.0) -> list[float]:
    return [base + scale / n] * n


def analyse(
    encoder: Encoder,
    images: ImageSet,
    *,
    estimator: str = "dv",
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int = 256,
    pool: int = 2,
    base: float = 1000.0,
    scale: float = 10000.0,
    mapping: str = "share",
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> MIResult:
    """Per-stage MI of ``encoder`` on ``images`` and the resulting MIMIC weights."""
    feats = extract_stage_features(encoder, images, pool=pool, device=device)
    raw = estimate_mi(feats.h, feats.z, estimator=estimator, epochs=epochs, batch_size=batch_size, lr=lr, hidden=hidden, seed=seed)
    mi = tuple(v if math.isfinite(v) and v > 0 else 0.0 for v in raw)
    return MIResult(feats.stages, mi, tuple(raw), tuple(mi_weights(mi, base, scale, mapping, temperature)), estimator)


def plot_mi(result: MIResult, path: str) -> None:
    """Bar plot of MI per stage, annotated with the weights (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(result.stages, result.mi, color="#4C72B0")
    for bar, w in zip(bars, result.weights):
        ax.annotate(f"β={w:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"MI estimate ({result.estimator}, nats)")
    ax.set_title("Mutual information with the final feature, per stage")
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
