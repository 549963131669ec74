"""SimCLR augmentations, batched on tensors (any device), driven by an explicit generator.

Per image, as in the spec: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)),
RandomHorizontalFlip(0.5), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (the four adjustments in a
random order), RandomGrayscale(0.2). Input and output are float images in [0, 1]; the encoder
applies the dataset normalisation itself. All random draws come from a CPU ``torch.Generator`` so
results do not depend on the device and a resumed run draws the same numbers.

A view is drawn (:func:`draw_view`: every random number of the batch, nothing else) and then applied
(:func:`apply_view`); each image's result depends only on its own row of the draw, so a DDP rank
that applies ``draw.rows(lo, hi)`` to its slice of the global batch gets exactly those rows of the
single-process views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = torch.where(
        maxc == r,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    return h, s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], dim=1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], dim=1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], dim=1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack([r, g, b], dim=1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by ``shift[i]`` (fraction of a turn)."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


@dataclass(frozen=True)
class ViewDraw:
    """The random numbers of one SimCLR view of a batch (CPU tensors, one row per image)."""

    theta: Tensor  # (n, 2, 3) affine crop (+ flip) of each image, in grid coordinates
    jitter: Tensor  # (n,) bool: colour jitter applied
    factors: dict[str, Tensor]  # brightness "b", contrast "c", saturation "s", hue "h": (n,) each
    order: tuple[int, ...]  # the order of the four jitter adjustments (one per batch)
    gray: Tensor  # (n,) bool: converted to grayscale

    def rows(self, lo: int, hi: int) -> "ViewDraw":
        """The draw of images ``lo:hi`` (a DDP rank's slice of the global batch)."""
        return ViewDraw(self.theta[lo:hi], self.jitter[lo:hi], {k: v[lo:hi] for k, v in self.factors.items()},
                        self.order, self.gray[lo:hi])


def _draw_crop(n: int, g: torch.Generator, scale: tuple[float, float], flip_p: float) -> Tensor:
    area = _uniform(n, scale[0], scale[1], g)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    ratio = torch.exp(log_ratio)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * (1 - w) + w / 2) * 2 - 1
    cy = (torch.rand(n, generator=g) * (1 - h) + h / 2) * 2 - 1
    flip = torch.where(torch.rand(n, generator=g) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    return theta


def _draw_jitter(n: int, g: torch.Generator, brightness: float, contrast: float, saturation: float, hue: float,
                 p: float) -> tuple[Tensor, dict[str, Tensor], tuple[int, ...]]:
    apply = torch.rand(n, generator=g) < p
    factors = {
        "b": _uniform(n, 1 - brightness, 1 + brightness, g),
        "c": _uniform(n, 1 - contrast, 1 + contrast, g),
        "s": _uniform(n, 1 - saturation, 1 + saturation, g),
        "h": _uniform(n, -hue, hue, g),
    }
    return apply, factors, tuple(torch.randperm(4, generator=g).tolist())


def _crop(x: Tensor, theta: Tensor, size: int) -> Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _jitter(x: Tensor, apply: Tensor, factors: dict[str, Tensor], order: tuple[int, ...]) -> Tensor:
    apply = apply.to(x.device).view(-1, 1, 1, 1)
    out = x
    for k in order:
        name = "bcsh"[k]
        f = factors[name].to(device=x.device, dtype=x.dtype)
        if name == "b":
            out = (out * f.view(-1, 1, 1, 1)).clamp(0, 1)
        elif name == "c":
            m = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            out = ((out - m) * f.view(-1, 1, 1, 1) + m).clamp(0, 1)
        elif name == "s":
            gr = _gray(out)
            out = ((out - gr) * f.view(-1, 1, 1, 1) + gr).clamp(0, 1)
        else:
            out = adjust_hue(out, f).clamp(0, 1)
    return torch.where(apply, out, x)


def _grayscale(x: Tensor, apply: Tensor) -> Tensor:
    apply = apply.to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def random_resized_crop(
    x: Tensor, g: torch.Generator, size: int, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5
) -> Tensor:
    """Per-image random resized crop (+ horizontal flip), one ``grid_sample`` for the batch."""
    return _crop(x, _draw_crop(x.shape[0], g, scale, flip_p), size)


def color_jitter(
    x: Tensor,
    g: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
) -> Tensor:
    return _jitter(x, *_draw_jitter(x.shape[0], g, brightness, contrast, saturation, hue, p))


def random_grayscale(x: Tensor, g: torch.Generator, p: float = 0.2) -> Tensor:
    return _grayscale(x, torch.rand(x.shape[0], generator=g) < p)


def draw_view(n: int, g: torch.Generator, crop_min_scale: float = 0.08) -> ViewDraw:
    """The random numbers of one SimCLR view of ``n`` images, drawn in :func:`simclr_augment`'s order."""
    theta = _draw_crop(n, g, (crop_min_scale, 1.0), 0.5)
    jitter, factors, order = _draw_jitter(n, g, 0.4, 0.4, 0.4, 0.1, 0.8)
    return ViewDraw(theta, jitter, factors, order, torch.rand(n, generator=g) < 0.2)


def apply_view(x: Tensor, draw: ViewDraw) -> Tensor:
    """Apply a drawn view to a batch of [0, 1] images (N, 3, H, W), N = the draw's rows."""
    x = _crop(x, draw.theta, x.shape[-1])
    return _grayscale(_jitter(x, draw.jitter, draw.factors, draw.order), draw.gray)


def simclr_augment(x: Tensor, g: torch.Generator, crop_min_scale: float = 0.08) -> Tensor:
    """One SimCLR view of a batch of [0, 1] images (N, 3, H, W)."""
    return apply_view(x, draw_view(x.shape[0], g, crop_min_scale))


def random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    """Each image flipped horizontally with probability 1/2 (the only augmentation of BadEncoder's
    fine-tuning, and of the attacks and defences that fine-tune an encoder)."""
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
