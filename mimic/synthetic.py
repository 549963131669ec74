"""Built-in procedural dataset (textures): the embedded default of ``mimic demo`` (no download).

Ten classes defined by the *structure* of a texture that fills the whole image: horizontal
stripes, vertical stripes, checkerboard, dot grid, concentric rings, grid lines, diagonal
cross-hatch, waves, blobs and radial spokes. Every image draws its own two colours (uniform over
the RGB cube, a minimum distance apart), period, phase, small rotation, a smooth illumination
gradient and pixel noise. Because colours and phases are random, every class has the same mean
image and a linear classifier on raw pixels stays near chance, while the classes survive the
SimCLR augmentations (any crop of a texture shows the same texture; horizontal flips map every
class to itself) so a small self-supervised encoder learns them in minutes on a CPU. Nothing is
systematically white in the bottom-right corner, where the usual BadEncoder trigger goes.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "hstripes",
    "vstripes",
    "checker",
    "dots",
    "rings",
    "grid",
    "crosshatch",
    "waves",
    "blobs",
    "spokes",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 32
_CHUNK = 1024
_MIN_COLOUR_DIST = 0.5


def describe() -> str:
    return f"mimic synthetic textures: {NUM_CLASSES} classes ({', '.join(CLASS_NAMES)}), {IMAGE_SIZE}x{IMAGE_SIZE} RGB, seed-deterministic"


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    fg = rng.random((n, 3))
    bg = rng.random((n, 3))
    for _ in range(20):  # redraw pairs that are too close to tell apart
        close = np.linalg.norm(fg - bg, axis=1) < _MIN_COLOUR_DIST
        if not close.any():
            break
        bg[close] = rng.random((int(close.sum()), 3))
    return fg, bg


def _pattern(cls: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """Soft masks in [0, 1], shape [n, 32, 32], for ``n`` images of class ``cls``."""
    s = IMAGE_SIZE
    yy, xx = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")
    xx, yy = xx[None], yy[None]

    def r(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    theta = r(-0.17, 0.17)  # +-10 degrees
    cx, cy = r(0, s), r(0, s)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    period = r(4.5, 8.0)
    phase = r(0, 2 * np.pi)
    two_pi = 2 * np.pi
    if cls == 0:
        field = np.sin(two_pi * v / period + phase)
    elif cls == 1:
        field = np.sin(two_pi * u / period + phase)
    elif cls == 2:
        field = np.sin(two_pi * u / period + phase) * np.sin(two_pi * v / period + r(0, 2 * np.pi))
        field = field * 2.0
    elif cls == 3:
        p = period * 1.3
        du = np.mod(u, p) - p / 2
        dv = np.mod(v, p) - p / 2
        field = (p * 0.3) - np.sqrt(du**2 + dv**2)
    elif cls == 4:
        field = np.sin(two_pi * np.sqrt(u**2 + v**2) / period + phase)
    elif cls == 5:
        p = period * 1.4
        du = np.abs(np.mod(u, p) - p / 2)
        dv = np.abs(np.mod(v, p) - p / 2)
        field = np.minimum(du, dv) - p * 0.15
        field = -field
    elif cls == 6:
        p = period * 1.4
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        da = np.abs(np.mod(a, p) - p / 2)
        db = np.abs(np.mod(b, p) - p / 2)
        field = -(np.minimum(da, db) - p * 0.15)
    elif cls == 7:
        q = r(10, 20)
        amp = period * r(0.35, 0.6)
        field = np.sin(two_pi * (v + amp * np.sin(two_pi * u / q + phase)) / period)
    elif cls == 8:
        field = np.zeros((n, s, s), dtype=np.float32)
        for _ in range(4):
            fx, fy = r(-0.25, 0.25), r(-0.25, 0.25)
            field = field + np.cos(two_pi * (fx * xx + fy * yy) / 2 + r(0, 2 * np.pi))
    else:
        k = rng.integers(5, 9, (n, 1, 1)).astype(np.float32)
        field = np.sin(k * np.arctan2(yy - cy, xx - cx) + phase)
    return 1.0 / (1.0 + np.exp(-4.0 * field))


def make_synthetic(n: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8 [n, 32, 32, 3], NHWC) and balanced int64 labels, determined by ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= num_classes <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in 1..{NUM_CLASSES}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    labels = labels[rng.permutation(n)].astype(np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for cls in range(num_classes):
        idx = np.nonzero(labels == cls)[0]
        for start in range(0, len(idx), _CHUNK):
            part = idx[start : start + _CHUNK]
            m = len(part)
            mask = _pattern(cls, rng, m)[..., None]
            fg, bg = _colours(rng, m)
            img = bg[:, None, None, :] * (1 - mask) + fg[:, None, None, :] * mask
            grad = rng.uniform(-0.15, 0.15, (m, 1, 1, 2))
            ramp = np.linspace(-1, 1, IMAGE_SIZE, dtype=np.float32)
            light = 1 + grad[..., 0:1] * ramp[None, None, :, None] + grad[..., 1:2] * ramp[None, :, None, None]
            img = img * light + rng.normal(0, 0.04, img.shape)
            images[part] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels
