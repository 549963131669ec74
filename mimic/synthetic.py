"""Built-in procedural image-classification dataset (the embedded default; nothing to download).

Ten classes defined by *shape / structure* only. Every image draws its own foreground and
background colour (independent, uniformly random RGB with a minimum colour distance), position,
scale, rotation (full for rotation-free shapes, a small jitter for the stripe classes), a smooth
background gradient plus low-frequency texture, pixel noise and up to two small distractor blobs.
Because foreground and background colours are exchangeable, every class has the same mean image,
so a linear classifier on raw pixels stays near chance while a small CNN learns the classes
easily.

Nothing here is systematically white in the bottom-right corner (the location of the usual
BadEncoder trigger): colours are uniform over the RGB cube and shapes are placed anywhere.

Usage::

    from mimic.synthetic import make_synthetic, CLASS_NAMES
    images, labels = make_synthetic(20_000, seed=0)   # uint8 [N,32,32,3] NHWC, int64 [N]

Generation is vectorised with numpy (SDF shape masks with anti-aliased edges, evaluated per class
over chunks of images); 20,000 images take roughly a second on one CPU core.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "describe", "make_synthetic"]

IMAGE_SIZE = 32
NUM_CLASSES = 10

CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "triangle",
    "plus",
    "star",
    "hstripes",
    "vstripes",
    "checker",
    "csquares",
)

_CHUNK = 2048

# Shape geometry is expressed in normalised units: u, v = pixel offset / scale, so most shapes fit
# in the unit disk and `scale` is their radius in pixels.
_SCALE_RANGE = (8.0, 13.0)
_MIN_COLOUR_DIST = 0.55  # Euclidean distance in [0,1]^3 between foreground and background
_STRIPE_JITTER = np.deg2rad(15.0)  # rotation jitter for the orientation-defined classes
_ORIENTED = {"hstripes", "vstripes", "dstripes"}


def describe() -> str:
    """One-line description for logs."""
    return (
        f"mimic synthetic shapes: {NUM_CLASSES} classes ({', '.join(CLASS_NAMES)}), "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB, random colours/position/scale/rotation, "
        "textured background, pixel noise, distractor blobs; procedural, seed-deterministic"
    )


# --------------------------------------------------------------------------------------------
# Signed distance functions (negative inside), all in normalised units, vectorised over [m,H,W].
# --------------------------------------------------------------------------------------------


def _band(t: np.ndarray, period: float, phase: np.ndarray | float = 0.0) -> np.ndarray:
    """Stripes along coordinate t: inside for half of every period."""
    f = np.mod(t / period + phase, 1.0)
    return (np.abs(f - 0.5) - 0.25) * period


def _sdf(name: str, u: np.ndarray, v: np.ndarray, phase: np.ndarray) -> np.ndarray:
    if name == "disk":
        return np.sqrt(u * u + v * v) - 0.9
    if name == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.75
    if name == "triangle":
        return _triangle(u, v)
    if name == "plus":
        au, av = np.abs(u), np.abs(v)
        arm_h = np.maximum(au - 0.95, av - 0.27)
        arm_v = np.maximum(au - 0.27, av - 0.95)
        return np.minimum(arm_h, arm_v)
    if name == "star":
        r = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        t = np.abs(np.mod(phi * (5.0 / (2.0 * np.pi)), 1.0) - 0.5) * 2.0  # 1 at points, 0 between
        radius = 0.42 + 0.6 * t
        return (r - radius) * 0.6
    window = np.maximum(np.abs(u), np.abs(v)) - 0.9
    if name == "hstripes":
        return np.maximum(window, _band(v, 0.45, phase))
    if name == "vstripes":
        return np.maximum(window, _band(u, 0.45, phase))
    if name == "checker":
        p = 0.5
        us, vs = u / p + phase, v / p + phase
        a, b = np.mod(us, 1.0), np.mod(vs, 1.0)
        edge = np.minimum(np.minimum(a, 1 - a), np.minimum(b, 1 - b)) * p
        parity = (np.floor(us) + np.floor(vs)) % 2 == 0
        return np.maximum(window, np.where(parity, -edge, edge))
    if name == "dstripes":
        # diagonal stripes in an (almost) axis-aligned window; direction "/" or "\\" by phase
        diag = (v + np.where(phase < 0.5, u, -u)) * np.float32(np.sqrt(0.5))
        return np.maximum(window, _band(diag, 0.45, phase * 2.0))
    if name == "bullseye":
        r = np.sqrt(u * u + v * v)
        return np.maximum(r - 0.95, _band(r, 0.4, 0.5))
    if name == "dots":
        p = 0.6
        a, b = np.mod(u / p + phase, 1.0) - 0.5, np.mod(v / p + phase, 1.0) - 0.5
        return np.maximum(window, np.sqrt(a * a + b * b) * p - 0.2)
    if name == "grid":
        p = 0.5
        a, b = np.mod(u / p + phase, 1.0) - 0.5, np.mod(v / p + phase, 1.0) - 0.5
        line = np.minimum(np.abs(a), np.abs(b)) * p - 0.07
        return np.maximum(window, line)
    if name == "csquares":
        c = np.maximum(np.abs(u), np.abs(v))
        return np.maximum(c - 0.95, _band(c, 0.4, 0.0))
    raise ValueError(name)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle, circumradius 1.2 (inradius 0.6), centred on its centroid."""
    d = None
    for k in range(3):
        a = -np.pi / 2 + 2 * np.pi * k / 3  # outward normals; one edge at the bottom
        dk = u * np.float32(np.cos(a)) + v * np.float32(np.sin(a))
        d = dk if d is None else np.maximum(d, dk)
    return d - 0.6


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def _colour_pairs(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent uniform RGB colours, pairs redrawn (both) until they differ enough.

    Redrawing both members keeps the joint distribution symmetric, so foreground and background
    colours have the same distribution and every class has the same mean image.
    """
    fg = rng.random((m, 3), dtype=np.float32)
    bg = rng.random((m, 3), dtype=np.float32)
    bad = np.linalg.norm(fg - bg, axis=1) < _MIN_COLOUR_DIST
    while bad.any():
        k = int(bad.sum())
        fg[bad] = rng.random((k, 3), dtype=np.float32)
        bg[bad] = rng.random((k, 3), dtype=np.float32)
        bad = np.linalg.norm(fg - bg, axis=1) < _MIN_COLOUR_DIST
    return fg, bg


def _render_chunk(rng: np.random.Generator, labels: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    m = labels.shape[0]
    size = IMAGE_SIZE
    f32 = np.float32
    pix = np.arange(size, dtype=f32) + f32(0.5)
    pn = pix / f32(size / 2) - f32(1.0)  # pixel centres in [-1, 1]

    # ---- geometry -----------------------------------------------------------------------------
    scale = rng.uniform(*_SCALE_RANGE, size=m).astype(f32)
    margin = f32(0.7) * scale  # centre anywhere that keeps most of the shape inside
    cx = (margin + rng.random(m, dtype=f32) * (size - 2 * margin)).astype(f32)
    cy = (margin + rng.random(m, dtype=f32) * (size - 2 * margin)).astype(f32)
    oriented = np.isin(labels, [i for i, c in enumerate(classes) if c in _ORIENTED])
    theta = np.where(
        oriented,
        rng.uniform(-_STRIPE_JITTER, _STRIPE_JITTER, size=m),
        rng.uniform(0.0, 2.0 * np.pi, size=m),
    ).astype(f32)
    phase = rng.random(m, dtype=f32)

    x = pix[None, None, :] - cx[:, None, None]
    y = pix[None, :, None] - cy[:, None, None]
    cos = (np.cos(theta) / scale)[:, None, None]
    sin = (np.sin(theta) / scale)[:, None, None]
    u = x * cos + y * sin
    v = y * cos - x * sin

    mask = np.empty((m, size, size), dtype=f32)
    for k, name in enumerate(classes):
        idx = np.flatnonzero(labels == k)
        if idx.size == 0:
            continue
        sd = _sdf(name, u[idx], v[idx], phase[idx, None, None])
        # anti-aliased coverage: signed distance in pixels, one-pixel ramp
        mask[idx] = np.clip(f32(0.5) - sd * scale[idx, None, None], 0.0, 1.0)

    # ---- colours, background texture, illumination --------------------------------------------
    # Scalar fields are [m, H, W]; the image is rendered channel-first ([m, 3, H, W], where numpy
    # broadcasting is fast) and transposed to NHWC by the caller.
    fg, bg = _colour_pairs(rng, m)
    # smooth background texture: two random low-frequency plane waves (sin(A + B) evaluated
    # separably), tinted by a random per-image colour vector
    tex = np.zeros((m, size, size), dtype=f32)
    for _ in range(2):
        freq = rng.uniform(0.5, 2.0, size=m).astype(f32) * f32(np.pi)  # 0.25..1 cycle over [-1,1]
        ang = rng.uniform(0.0, 2.0 * np.pi, size=m).astype(f32)
        ph = rng.uniform(0.0, 2.0 * np.pi, size=m).astype(f32)
        amp = rng.uniform(0.3, 1.0, size=m).astype(f32)
        a = (np.cos(ang) * freq)[:, None] * pn[None, :] + ph[:, None]  # along x: [m, W]
        b = (np.sin(ang) * freq)[:, None] * pn[None, :]  # along y: [m, H]
        sa, ca = (np.sin(a) * amp[:, None])[:, None, :], (np.cos(a) * amp[:, None])[:, None, :]
        sb, cb = np.sin(b)[:, :, None], np.cos(b)[:, :, None]
        tex += sa * cb
        tex += ca * sb
    tint = rng.uniform(-0.06, 0.06, size=(m, 3)).astype(f32)
    # illumination gradient over the whole image (shape included)
    g_amp = rng.uniform(0.0, 0.15, size=m).astype(f32)
    g_ang = rng.uniform(0.0, 2.0 * np.pi, size=m).astype(f32)
    grad = (np.cos(g_ang) * g_amp)[:, None, None] * pn[None, None, :] + (np.sin(g_ang) * g_amp)[
        :, None, None
    ] * pn[None, :, None]

    # image = fg * coverage + (bg + texture) * (1 - coverage) + gradient
    img = tex[:, None] * tint[:, :, None, None]
    img += (bg - fg)[:, :, None, None]
    img *= (f32(1.0) - mask)[:, None]
    img += (grad[:, None] + fg[:, :, None, None])

    # ---- distractor blobs (0, 1 or 2 small disks of a random colour), drawn in 8x8 windows ------------
    count = rng.choice(3, size=m, p=[0.4, 0.4, 0.2])
    win = np.arange(8)
    for j in range(2):
        sel = np.flatnonzero(count > j)
        k = sel.size
        bx = rng.uniform(2.0, size - 2.0, size=k).astype(f32)
        by = rng.uniform(2.0, size - 2.0, size=k).astype(f32)
        br = rng.uniform(1.2, 2.5, size=k).astype(f32)
        bcol = rng.random((k, 3), dtype=f32)
        x0 = np.clip(np.floor(bx).astype(np.int64) - 4, 0, size - 8)
        y0 = np.clip(np.floor(by).astype(np.int64) - 4, 0, size - 8)
        cols = x0[:, None] + win[None, :]  # [k, 8]
        rows = y0[:, None] + win[None, :]
        d = np.sqrt(
            (cols[:, None, :] + f32(0.5) - bx[:, None, None]) ** 2
            + (rows[:, :, None] + f32(0.5) - by[:, None, None]) ** 2
        ).astype(f32)
        bm = np.clip(f32(0.5) - (d - br[:, None, None]), 0.0, 1.0)[..., None]  # [k, 8, 8, 1]
        ii, rr, cc = sel[:, None, None], rows[:, :, None], cols[:, None, :]
        patch = img[ii, :, rr, cc]  # [k, 8, 8, 3] (advanced indices first)
        patch += (bcol[:, None, None, :] - patch) * bm
        img[ii, :, rr, cc] = patch

    # ---- pixel noise (uniform, per-image strength), quantisation --------------------------------------
    sigma = rng.uniform(0.01, 0.06, size=m).astype(f32) * f32(np.sqrt(3.0) / 128.0)
    noise = np.frombuffer(rng.bytes(img.size), dtype=np.int8).reshape(img.shape)
    img += noise * sigma[:, None, None, None]
    np.clip(img, 0.0, 1.0, out=img)
    img *= f32(255.0)
    img += f32(0.5)
    return img.astype(np.uint8)


def make_synthetic(n: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` images of the built-in shapes dataset.

    Returns ``(images, labels)``: uint8 ``[n, 32, 32, 3]`` RGB (NHWC) and int64 ``[n]`` with
    values in ``[0, num_classes)``. Classes are balanced (``n // num_classes`` each, the remainder
    spread one each over the first classes) and shuffled. The output is fully determined by
    ``(n, seed, num_classes)``. ``num_classes < 10`` uses the first ``num_classes`` of
    :data:`CLASS_NAMES`.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= int(num_classes) <= NUM_CLASSES:
        raise ValueError(f"num_classes must be in [1, {NUM_CLASSES}], got {num_classes}")
    classes = CLASS_NAMES[: int(num_classes)]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(classes)).astype(np.int64)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        images[start:stop] = _render_chunk(rng, labels[start:stop], classes).transpose(0, 2, 3, 1)
    return images, labels
