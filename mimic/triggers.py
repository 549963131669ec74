"""Backdoor triggers: a pattern and a mask, stamped in pixel space ([0, 1] images).

Stamping blends the pattern ``p`` into an image ``x`` through the mask ``m``:

    x' = (1 - m) * x + m * p          m in [0, 1]^(H x W), p in [0, 1]^(3 x H x W)

A binary mask is a patch trigger (BadNets/BadEncoder); a fractional mask is a blended trigger
(``m = alpha`` everywhere: the blended full-image trigger of Chen et al. 2017). With
``placement="random"`` the mask's content (its bounding box) lands at a new uniformly drawn place
in every image (the position varies per image, the pattern does not).

Files are compatible with BadEncoder's trigger files: an NPZ with ``t`` (trigger image,
[1, H, W, 3], 0..255) and ``tm`` (mask, [1, H, W, 3]). A binary mask is stored as uint8 0/1 (exactly
BadEncoder's layout); a soft mask as float32 in [0, 1]; a random placement adds ``placement``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mimic.errors import ConfigError, DataError
from mimic.runtime import generator as derived_generator

PLACEMENTS = ("fixed", "random")
POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "centre", "random", "full")
PATTERNS = ("white", "colour", "noise")
COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
}
RANDOM_PLACEMENT_SEED = 0  # positions drawn when a caller passes no generator (evaluation: the same every run)


@dataclass(frozen=True)
class Trigger:
    patch: Tensor  # float [3, H, W] in [0, 1]
    mask: Tensor  # float [1, H, W] in [0, 1]
    placement: str = "fixed"  # fixed | random (the mask's bounding box moves to a random place per image)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise DataError(f"trigger placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")

    @property
    def binary(self) -> bool:
        return bool(((self.mask == 0) | (self.mask == 1)).all())

    @property
    def area(self) -> float:
        """``|m|_1 / (H W)``: the share of the image the mask covers (fractional pixels count fractionally)."""
        return float(self.mask.sum()) / float(self.mask.shape[-1] * self.mask.shape[-2])

    def stamp(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] with the trigger applied (``generator``: random placements)."""
        if x.shape[-2:] != self.patch.shape[-2:]:
            raise DataError(f"trigger is {tuple(self.patch.shape[-2:])} but images are {tuple(x.shape[-2:])}")
        if self.placement == "random":
            m, p = self._placed(len(x), generator)
            m, p = m.to(x.device, x.dtype), p.to(x.device, x.dtype)
            return x * (1 - m) + p * m
        m = self.mask.to(x.device, x.dtype)
        return x * (1 - m) + self.patch.to(x.device, x.dtype) * m

    def _placed(self, n: int, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Per-image masks [n, 1, H, W] and patterns [n, 3, H, W]: the mask's bounding box at a random place."""
        rows = torch.nonzero(self.mask[0].sum(1)).flatten()
        cols = torch.nonzero(self.mask[0].sum(0)).flatten()
        H, W = self.mask.shape[-2:]
        masks, patches = torch.zeros(n, 1, H, W), torch.zeros(n, 3, H, W)
        if len(rows) == 0:
            return masks, patches
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        h, w = r1 - r0, c1 - c0
        g = g if g is not None else derived_generator(RANDOM_PLACEMENT_SEED, "trigger-placement")
        tops = torch.randint(0, H - h + 1, (n,), generator=g)
        lefts = torch.randint(0, W - w + 1, (n,), generator=g)
        m_box, p_box = self.mask[:, r0:r1, c0:c1], self.patch[:, r0:r1, c0:c1]
        for i, (t, left) in enumerate(zip(tops.tolist(), lefts.tolist())):
            masks[i, :, t:t + h, left:left + w] = m_box
            patches[i, :, t:t + h, left:left + w] = p_box
        return masks, patches

    def to_extras(self) -> dict[str, Tensor | str]:
        out: dict[str, Tensor | str] = {"trigger_patch": self.patch.clone(), "trigger_mask": self.mask.clone()}
        if self.placement != "fixed":
            out["trigger_placement"] = self.placement
        return out

    @classmethod
    def from_extras(cls, extras: dict) -> "Trigger | None":
        if "trigger_patch" in extras and "trigger_mask" in extras:
            return cls(extras["trigger_patch"].float(), extras["trigger_mask"].float(),
                       str(extras.get("trigger_placement", "fixed")))
        return None

    def save_npz(self, path: str | Path) -> None:
        """BadEncoder's layout; a soft mask as float32 in [0, 1], a random placement as ``placement``."""
        t = (self.patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[None]
        tm = np.repeat(self.mask.permute(1, 2, 0).numpy(), 3, axis=-1)[None]
        tm = tm.astype(np.uint8) if self.binary else tm.astype(np.float32)
        extra = {"placement": np.array(self.placement)} if self.placement != "fixed" else {}
        np.savez(path, t=t, tm=tm, **extra)

    @classmethod
    def load_npz(cls, path: str | Path) -> "Trigger":
        """Read a trigger NPZ: an integer mask counts as binary (non-zero = 1, BadEncoder files), a
        float mask in [0, 1] stays soft (a float mask in 0..255 is scaled to [0, 1])."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "t" not in z.files or "tm" not in z.files:
                    raise DataError(f"{path}: a trigger file needs arrays 't' and 'tm' (BadEncoder layout)")
                t, tm = z["t"], z["tm"]
                placement = str(z["placement"]) if "placement" in z.files else "fixed"
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: not a readable trigger NPZ ({type(exc).__name__})") from None
        t = t.reshape(t.shape[-3:]) if t.ndim == 4 else t
        tm = tm.reshape(tm.shape[-3:]) if tm.ndim == 4 else tm
        if t.ndim != 3 or t.shape != tm.shape:
            raise DataError(f"{path}: trigger and mask must both be [H, W, 3]")
        tm = tm.astype(np.uint8) if tm.dtype == np.bool_ else tm
        if not (np.issubdtype(t.dtype, np.number) and np.issubdtype(tm.dtype, np.number)):
            raise DataError(f"{path}: trigger arrays must be numeric")
        if not (np.isfinite(t).all() and np.isfinite(tm).all()) or t.min() < 0 or tm.min() < 0:
            raise DataError(f"{path}: trigger values must be finite and non-negative")
        patch = torch.from_numpy(t.astype(np.float32)).permute(2, 0, 1)
        if patch.max() > 1.0:
            patch = patch / 255.0
        if np.issubdtype(tm.dtype, np.floating):
            m = tm.astype(np.float32)
            m = m / 255.0 if m.max() > 1.0 else m
        else:
            m = (tm > 0).astype(np.float32)
        mask = torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1)[:1]
        if placement not in PLACEMENTS:
            raise DataError(f"{path}: unknown trigger placement {placement!r}")
        return cls(patch.clamp(0, 1), mask.clamp(0, 1).contiguous(), placement)


def white_patch(size: int = 10, margin: int = 1, image_size: int = 32) -> Trigger:
    """A ``size`` x ``size`` white square ``margin`` pixels from the bottom-right corner."""
    if size + margin > image_size:
        raise DataError(f"a {size}px trigger with margin {margin} does not fit a {image_size}px image")
    patch = torch.zeros(3, image_size, image_size)
    mask = torch.zeros(1, image_size, image_size)
    lo, hi = image_size - margin - size, image_size - margin
    patch[:, lo:hi, lo:hi] = 1.0
    mask[:, lo:hi, lo:hi] = 1.0
    return Trigger(patch, mask)


def _corner(position: str, size: int, margin: int, image_size: int) -> tuple[int, int]:
    """Top-left (row, column) of a ``size`` square at ``position``, ``margin`` pixels from the borders."""
    far, near = image_size - margin - size, margin
    centre = (image_size - size) // 2
    return {"bottom_right": (far, far), "bottom_left": (far, near), "top_right": (near, far), "top_left": (near, near),
            "centre": (centre, centre), "random": (0, 0)}[position]


def make_trigger(
    size: int = 10, margin: int = 1, position: str = "bottom_right", pattern: str = "white", colour: str = "white",
    alpha: float = 1.0, image_size: int = 32, seed: int = 0,
) -> Trigger:
    """A trigger from its description (the ``attack.trigger_*`` params).

    * ``position``: a corner or ``centre`` (a ``size`` square ``margin`` pixels from the borders),
      ``random`` (the square lands at a new place in every image), ``full`` (the whole image: with
      ``alpha < 1`` the blended full-image trigger; ``size``/``margin`` unused);
    * ``pattern``: ``white``, ``colour`` (one of :data:`COLOURS`), ``noise`` (uniform RGB noise per
      pixel, drawn from ``seed``);
    * ``alpha``: the mask value inside the trigger (1 = the pattern replaces the pixels).

    ``make_trigger()`` is :func:`white_patch` ``(10, 1)`` exactly.
    """
    if position not in POSITIONS:
        raise ConfigError(f"trigger position must be one of {', '.join(POSITIONS)}, got {position!r}")
    if pattern not in PATTERNS:
        raise ConfigError(f"trigger pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if colour not in COLOURS:
        raise ConfigError(f"trigger colour must be one of {', '.join(COLOURS)}, got {colour!r}")
    if not 0 < alpha <= 1:
        raise ConfigError(f"trigger alpha must be in (0, 1], got {alpha}")
    if position == "bottom_right" and pattern == "white" and alpha == 1.0:
        return white_patch(size, margin, image_size)
    if position != "full" and size + margin > image_size:
        raise DataError(f"a {size}px trigger with margin {margin} does not fit a {image_size}px image")
    if position == "full":
        top, left, h = 0, 0, image_size
    else:
        (top, left), h = _corner(position, size, margin, image_size), size
    if pattern == "white":
        box = torch.ones(3, h, h)
    elif pattern == "colour":
        box = torch.tensor(COLOURS[colour]).view(3, 1, 1).expand(3, h, h).clone()
    else:
        box = torch.rand(3, h, h, generator=derived_generator(seed, "trigger-noise", h))
    patch = torch.zeros(3, image_size, image_size)
    mask = torch.zeros(1, image_size, image_size)
    patch[:, top:top + h, left:left + h] = box
    mask[:, top:top + h, left:left + h] = float(alpha)
    return Trigger(patch, mask, "random" if position == "random" else "fixed")
