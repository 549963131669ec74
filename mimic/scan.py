"""Trigger inversion without labels: is this encoder backdoored, and with what trigger?

The method of DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023),
written for mimic from the paper. A backdoored encoder f maps *every* image carrying its trigger
next to one embedding (the attacker's reference), so a small mask and pattern exist that make the
embeddings of clean images collapse; for a clean encoder only a large one does (in the limit the
whole image: identical images have identical embeddings). The scan searches the smallest one:

    m = sigmoid(a) in (0, 1)^(H x W),   p = sigmoid(b) in (0, 1)^(3 x H x W)
    x' = (1 - m) * x + m * p                                   (mimic.triggers.Trigger.stamp)
    S(Z) = mean_{i != j} cos(z_i, z_j) = (||sum_i u_i||^2 - N) / (N (N - 1)),  u_i = z_i / ||z_i||
    L(a, b) = (1 - S(f(x'_1..N))) + lambda * ||m||_1           (Adam on a, b; batches of clean images)

The set level is relative to the similarity ``S0`` the clean images already have (``scan.collapse``
= q): ``s* = S0 + q (1 - S0)``, the stamped images must close the share q of the gap to a perfect
collapse. (DECREE sets an absolute 0.99 for well-trained encoders, whose clean images are far
apart; a small or degenerate encoder whose clean embeddings already agree at S0 = 0.95 would
"collapse" under any speck with an absolute level.)

``lambda`` is adapted so that S reaches the set level ``s*``: after more than
``patience`` consecutive steps with ``S >= s*`` it is multiplied by ``lambda_factor`` (shrink the
mask), after more than ``patience`` steps below it is divided (let the mask grow). The result is
the smallest mask seen at ``S >= s*``; the search stops ``stop_patience`` steps after that mask
last shrank. Its size is

    PL1 = ||m||_1 / (H W)     (the share of the image the inverted trigger covers; 1 = the whole image)

and ``PL1 < scan.threshold`` makes the encoder *suspicious*. When ``s*`` is never reached the whole
image is the smallest trigger known: PL1 = 1. The similarity reported is ``S`` of the returned
trigger over the whole scan set (every pair, no gradient), next to ``S`` of the clean images.

With labelled images the *collapse class* is the class the stamped images collapse to: every
stamped image votes for the class whose clean feature centroid (mean of the L2-normalised
features, re-normalised) is most cosine-similar to its feature; the majority wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mimic.data import ImageSet, batches, require_size, to_float
from mimic.encoders import Encoder, evaluating
from mimic.evaluate import extract_features
from mimic.losses import mean_pairwise_cosine
from mimic.runtime import generator
from mimic.triggers import Trigger

LAMBDA_RANGE = (1e-6, 1e4)  # lambda stays within these bounds


@dataclass(frozen=True)
class ScanSettings:
    """The optimisation's knobs (``scan.*`` params)."""

    steps: int = 300  # most optimisation steps
    batch_size: int = 32  # images per search and step
    lr: float = 0.1  # Adam on the logits a, b
    collapse: float = 0.9  # q: s* = S0 + q (1 - S0), S0 the clean images' similarity
    lambda_init: float = 1e-3
    lambda_factor: float = 2.0
    patience: int = 5  # steps above / below s* before lambda moves
    stop_patience: int = 60  # steps without a smaller valid mask before stopping
    grid: int = 3  # start points: grid x grid squares, the whole image, a random mask
    start_size: float = 0.375  # side of a start square / image side
    probe_steps: int = 40  # after this many steps only the ``keep`` best searches go on
    keep: int = 2


@dataclass(frozen=True)
class ScanResult:
    trigger: Trigger  # the smallest mask that reached s* (or the last one when none did)
    pl1: float
    reached: bool
    similarity: float  # S of the stamped scan set with ``trigger``
    clean_similarity: float  # S0: S of the clean scan set
    target_similarity: float  # s*
    steps: int
    lambda_final: float
    history: list[dict] = field(default_factory=list)
    start: str = ""  # the start point of the search that found the trigger
    target_class: int | None = None
    target_share: float | None = None  # share of stamped images voting for target_class

    def to_dict(self) -> dict:
        return {"pl1": round(self.pl1, 6), "reached": self.reached, "similarity": round(self.similarity, 6),
                "clean_similarity": round(self.clean_similarity, 6), "target_similarity": round(self.target_similarity, 6),
                "steps": self.steps,
                "lambda_final": self.lambda_final, "start": self.start, "target_class": self.target_class,
                "target_share": None if self.target_share is None else round(self.target_share, 4),
                "history": self.history}


def scan_verdict(pl1: float, threshold: float, reached: bool = True) -> dict:
    """``{"verdict": suspicious | clean, "suspicious", "reason", "threshold"}``: suspicious when PL1 < threshold.

    Kept apart from the search so a new threshold re-judges cached scans without re-running them.
    """
    suspicious = pl1 < threshold
    found = "" if reached else " (no trigger reached the set similarity: the whole image)"
    return {"verdict": "suspicious" if suspicious else "clean", "suspicious": suspicious, "threshold": threshold,
            "reason": f"PL1 {pl1:.4f} {'<' if suspicious else '>='} threshold {threshold:g}{found}"}


def set_similarity(encoder: Encoder, x: Tensor, trigger: Trigger | None, device: torch.device | str = "cpu") -> float:
    """S over every pair of the uint8 images ``x`` (stamped with ``trigger`` when given), no gradient."""
    feats = extract_features(encoder, x, trigger=trigger, device=device)
    return float(mean_pairwise_cosine(feats))


def collapse_class(encoder: Encoder, trigger: Trigger, labelled: ImageSet, device: torch.device | str = "cpu") -> tuple[int, float]:
    """(class, vote share): the class whose clean centroid the stamped images of ``labelled`` lie nearest."""
    if labelled.y is None:
        raise ValueError("the collapse class needs labelled images")
    clean = extract_features(encoder, labelled.x, device=device)
    classes = torch.unique(labelled.y)
    centroids = F.normalize(torch.stack([clean[labelled.y == c].mean(0) for c in classes]), dim=1)
    stamped = extract_features(encoder, labelled.x, trigger=trigger, device=device)
    votes = classes[(stamped @ centroids.t()).argmax(1)]
    counts = torch.bincount(votes, minlength=int(classes.max()) + 1)
    winner = int(torch.argmax(counts))  # ties: the lowest class index
    return winner, float(counts[winner]) / len(votes)


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


def start_points(h: int, w: int, grid: int, size: float, g: torch.Generator) -> tuple[Tensor, Tensor, list[str]]:
    """Initial masks [K, 1, H, W] and patterns [K, 3, H, W] of the K = grid^2 + 2 searches: squares of side
    ``size * H`` (mask 0.9, 0.05 elsewhere) on a ``grid`` x ``grid`` lattice spanning the image, the
    whole image (0.9), and DECREE's uniform random mask; every pattern uniform random."""
    side = max(1, round(size * min(h, w)))
    masks, names = [], []
    rows = torch.linspace(0, h - side, grid).round().long().tolist() if grid > 1 else [(h - side) // 2]
    cols = torch.linspace(0, w - side, grid).round().long().tolist() if grid > 1 else [(w - side) // 2]
    for r in rows:
        for c in cols:
            m = torch.full((1, h, w), 0.05)
            m[:, r:r + side, c:c + side] = 0.9
            masks.append(m)
            names.append(f"square@{r},{c}")
    masks += [torch.full((1, h, w), 0.9), torch.rand(1, h, w, generator=g)]
    names += ["whole image", "random"]
    patterns = torch.rand(len(masks), 3, h, w, generator=g)
    return torch.stack(masks), patterns, names


@dataclass
class _Searches:
    """K independent searches optimised together (one Adam over all: elementwise, so they do not interact)."""

    a: Tensor  # mask logits [K, 1, H, W]
    b: Tensor  # pattern logits [K, 3, H, W]
    names: list[str]
    lam: list[float]
    lr: float
    up: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)
    best_l1: list[float] = field(default_factory=list)
    best: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)
    since_best: list[int] = field(default_factory=list)
    last_sim: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = len(self.names)
        self.a, self.b = self.a.detach().clone().requires_grad_(True), self.b.detach().clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.a, self.b], lr=self.lr, betas=(0.5, 0.9))
        for name, fill in (("up", 0), ("down", 0), ("best_l1", math.inf), ("best", None), ("since_best", 0),
                           ("last_sim", -1.0)):
            if len(getattr(self, name)) != k:
                setattr(self, name, [fill] * k)

    def step(self, encoder: Encoder, x: Tensor, target: float, s: ScanSettings) -> None:
        k, n = len(self.names), x.shape[0]
        m, p = torch.sigmoid(self.a), torch.sigmoid(self.b)
        z = encoder(torch.cat([Trigger(p[i], m[i]).stamp(x) for i in range(k)])).float().view(k, n, -1)
        sims = torch.stack([mean_pairwise_cosine(z[i]) for i in range(k)])
        l1 = m.sum(dim=(1, 2, 3))
        loss = ((1 - sims) + torch.tensor(self.lam, device=l1.device) * l1).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        for i, (sim, norm) in enumerate(zip(sims.detach().tolist(), l1.detach().tolist())):
            self.last_sim[i] = sim
            self.since_best[i] += 1
            if sim >= target:
                self.up[i], self.down[i] = self.up[i] + 1, 0
                if norm < self.best_l1[i]:
                    self.best_l1[i], self.best[i], self.since_best[i] = norm, (m[i].detach().clone(), p[i].detach().clone()), 0
            else:
                self.up[i], self.down[i] = 0, self.down[i] + 1
            if self.up[i] > s.patience:
                self.lam[i], self.up[i] = min(self.lam[i] * s.lambda_factor, LAMBDA_RANGE[1]), 0
            elif self.down[i] > s.patience:
                self.lam[i], self.down[i] = max(self.lam[i] / s.lambda_factor, LAMBDA_RANGE[0]), 0

    def ranking(self) -> list[int]:
        """Searches by their smallest valid mask (those that never reached s* last, by similarity)."""
        return sorted(range(len(self.names)), key=lambda i: (self.best_l1[i], -self.last_sim[i]))

    def keep(self, idx: list[int]) -> "_Searches":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return _Searches(self.a[idx], self.b[idx], pick(self.names), pick(self.lam), self.lr, pick(self.up),
                         pick(self.down), pick(self.best_l1), pick(self.best), pick(self.since_best), pick(self.last_sim))

    def stalled(self, patience: int) -> bool:
        return all(b is not None and n >= patience for b, n in zip(self.best, self.since_best))


def invert_trigger(
    encoder: Encoder, clean: ImageSet, settings: ScanSettings, *, seed: int, device: torch.device | str = "cpu",
    labelled: ImageSet | None = None, progress: bool = False,
) -> ScanResult:
    """Search the smallest mask + pattern that collapse ``encoder``'s embeddings of ``clean`` (module docstring)."""
    require_size(clean, 2, "scan set")
    s = settings
    H, W = clean.x.shape[-2:]
    s0 = set_similarity(encoder, clean.x, None, device)
    target = s0 + s.collapse * (1 - s0)
    m0, p0, names = start_points(H, W, s.grid, s.start_size, generator(seed, "scan-init"))
    search = _Searches(_logit(m0).to(device), _logit(p0).to(device), names, [s.lambda_init] * len(names), s.lr)
    step, history = 0, []
    batch_size = min(s.batch_size, len(clean))
    params = [p for p in encoder.parameters() if p.requires_grad]
    was_training = encoder.training
    encoder.eval().requires_grad_(False)
    bar = _progress(s.steps, progress)
    try:
        epoch = 0
        while step < s.steps and not search.stalled(s.stop_patience):
            for idx in batches(len(clean), batch_size, generator(seed, "scan", epoch), drop_last=len(clean) >= 2 * batch_size):
                if step >= s.steps or search.stalled(s.stop_patience):
                    break
                if len(idx) < 2:
                    continue
                search.step(encoder, to_float(clean.x[idx], device), target, s)
                step += 1
                if step == s.probe_steps and len(search.names) > s.keep:
                    search = search.keep(search.ranking()[: s.keep])
                top = search.ranking()[0]
                best_pl1 = search.best_l1[top] / (H * W)
                if step % 10 == 0 or step == 1:
                    history.append({"step": step, "searches": len(search.names), "best": search.names[top],
                                    "similarity": round(search.last_sim[top], 5),
                                    "pl1": round(best_pl1, 5) if math.isfinite(best_pl1) else None,
                                    "lambda": search.lam[top]})
                bar.update(1)
                bar.set_postfix(searches=len(search.names), sim=f"{search.last_sim[top]:.3f}",
                                best="-" if not math.isfinite(best_pl1) else f"{best_pl1:.4f}")
            epoch += 1
    finally:
        bar.close()
        encoder.train(was_training)
        for prm in params:
            prm.requires_grad_(True)
    top = search.ranking()[0]
    reached = search.best[top] is not None
    lam = search.lam[top]
    if search.best[top] is not None:
        m_best, p_best = search.best[top]  # type: ignore[misc]
    else:
        m_best, p_best = torch.sigmoid(search.a[top]).detach(), torch.sigmoid(search.b[top]).detach()
    start = search.names[top]
    # the pattern in 1/255 steps, as trigger.npz stores it: what is measured here is what --trigger reads back
    trigger = Trigger((p_best.cpu().clamp(0, 1) * 255).round() / 255, m_best.cpu().clamp(0, 1))
    pl1 = trigger.area if reached else 1.0
    cls, share = collapse_class(encoder, trigger, labelled, device) if labelled is not None and labelled.y is not None else (None, None)
    return ScanResult(trigger=trigger, pl1=pl1, reached=reached, similarity=set_similarity(encoder, clean.x, trigger, device),
                      clean_similarity=s0, target_similarity=target, steps=step, lambda_final=lam,
                      history=history, start=start, target_class=cls, target_share=share)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="scan", unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def plot_trigger(result: ScanResult, images: Tensor, path: str, title: str = "") -> None:
    """``trigger.png``: the mask, the pattern, mask x pattern, and a few clean images stamped (uint8 ``images``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = result.trigger
    shown = images[:4]
    stamped = t.stamp(to_float(shown)) if len(shown) else shown
    panels = [("mask", t.mask[0].numpy(), "gray"), ("pattern", t.patch.permute(1, 2, 0).numpy(), None),
              ("mask x pattern", (t.mask * t.patch).permute(1, 2, 0).numpy(), None)]
    panels += [(f"stamped {i + 1}", img.permute(1, 2, 0).clamp(0, 1).numpy(), None) for i, img in enumerate(stamped)]
    fig = Figure(figsize=(1.6 * len(panels), 2.2), dpi=120)
    FigureCanvasAgg(fig)
    for i, (name, img, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{title + ': ' if title else ''}PL1 {result.pl1:.4f}, similarity {result.similarity:.3f} "
                 f"(clean images {result.clean_similarity:.3f})",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
