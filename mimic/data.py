"""Datasets: NPZ (CIFAR layout), image folders, torchvision roots and the built-in synthetic set.

Images live in memory as uint8 tensors (N, 3, H, W); batches are converted to float [0, 1] on the
device. Every dataset carries a content hash (``version``) so caches and logs can name it.

Source strings (``data.source``):

* ``synthetic`` -- the built-in procedural dataset (:mod:`mimic.synthetic`), the embedded default;
* ``PATH.npz`` -- keys ``x_train`` uint8 [N, H, W, 3], ``y_train`` [N], optional ``x_test``/``y_test``
  (the layout of ``shared/data/cifar10.npz``);
* ``DIR`` -- an image folder: one sub-folder per class (labelled), or images directly in ``DIR``
  (unlabelled, enough for the defender's clean set); an optional ``train/`` + ``test/`` split;
* ``torchvision:cifar10:ROOT`` / ``torchvision:cifar100:ROOT`` / ``torchvision:stl10:ROOT`` -- an
  already downloaded torchvision dataset root (never downloads).

Corrupt images in a folder are **skipped and counted** (``Dataset.skipped``, logged as a warning
and recorded in the results), never silently used; a folder (or class folder) with no readable
image is refused. Everything else that is wrong is refused with a one-line :class:`DataError`: an
empty dataset, a wrong NPZ layout (missing ``x_train``, wrong shape, object arrays), labels that are
not integers, negative, one per image, or not ``0..C-1`` with every class present in the training
split (1-based labels, a stray or huge label), and test labels or class folders the training split
does not have.
"""

from __future__ import annotations

import functools

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mimic.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8, N x 3 x H x W) and optional integer labels."""

    x: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx: Tensor) -> "ImageSet":
        return ImageSet(self.x[idx], None if self.y is None else self.y[idx])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: ImageSet
    test: ImageSet | None
    num_classes: int
    version: str
    skipped: int = 0
    class_names: tuple[str, ...] = field(default=())

    @property
    def labelled(self) -> bool:
        return self.train.y is not None


def content_hash(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _nhwc_to_tensor(x: np.ndarray, where: str) -> Tensor:
    if x.dtype == object:
        raise DataError(f"{where}: object arrays are refused")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: expected images shaped [N, H, W, 3], got {list(x.shape)}")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and np.nanmax(x) <= 1.0 + 1e-6 and np.nanmin(x) >= 0:
            x = np.round(x * 255)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 255:
            raise DataError(f"{where}: pixel values must be uint8 or within [0, 255]")
        x = x.astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _labels(y: np.ndarray, n: int, where: str, num_classes: int | None = None) -> Tensor:
    if y.dtype == object or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: labels must be integers")
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise DataError(f"{where}: {y.shape[0]} labels for {n} images")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.mod(y, 1) == 0):
        raise DataError(f"{where}: labels must be integers")
    y = y.astype(np.int64)
    if n and y.min() < 0:
        raise DataError(f"{where}: negative label {int(y.min())}")
    if num_classes is not None and n and y.max() >= num_classes:
        raise DataError(f"{where}: label {int(y.max())} out of range for {num_classes} classes")
    return torch.from_numpy(y)


def _require_dense(y: Tensor, num_classes: int, where: str) -> None:
    """Labels must be 0..C-1 with every class present in the training split.

    A gap means 1-based labels (label 10 in a 10-class set), a stray label, or a huge label that
    would make a probe with millions of outputs; an unlabelled set can simply omit the labels.
    """
    present = torch.unique(y).tolist()  # sorted; never allocates num_classes entries
    n_empty = num_classes - len(present)
    if n_empty:
        empty, seen = [], set(present)
        c = 0
        while len(empty) < 5 and c < num_classes:
            if c not in seen:
                empty.append(c)
            c += 1
        shown = ", ".join(map(str, empty)) + (f" (and {n_empty - len(empty)} more)" if n_empty > len(empty) else "")
        hint = " (1-based labels?)" if empty[0] == 0 else ""
        raise DataError(
            f"{where}: label {num_classes - 1} out of range for the {len(present)} classes present: labels must be "
            f"0..C-1 with every class in the training split, no image has class {shown}{hint}; "
            "omit the labels for an unlabelled set"
        )


def load_npz(path: Path) -> Dataset:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would take anything else for a pickle
        raise DataError(f"{path}: not a readable NPZ file (no zip archive: {'empty' if not magic else 'wrong magic bytes'})")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "x_train" not in keys:
                raise DataError(f"{path}: NPZ layout not recognised: need x_train (and y_train, x_test, y_test); found {sorted(keys)}")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in keys}
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(f"{path}: refused: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError ...
        raise DataError(f"{path}: not a readable NPZ file ({type(exc).__name__})") from None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test must come together")
    xtr = _nhwc_to_tensor(arrays["x_train"], f"{path}:x_train")
    ytr = _labels(arrays["y_train"], len(xtr), f"{path}:y_train") if "y_train" in arrays else None
    test = None
    if "x_test" in arrays:
        xte = _nhwc_to_tensor(arrays["x_test"], f"{path}:x_test")
        test = ImageSet(xte, _labels(arrays["y_test"], len(xte), f"{path}:y_test"))
        if xte.shape[1:] != xtr.shape[1:]:
            raise DataError(f"{path}: train and test images differ in shape")
    num_classes = 0
    if ytr is not None and len(ytr):
        num_classes = int(ytr.max()) + 1
        _require_dense(ytr, num_classes, f"{path}:y_train")
        if test is not None and test.y is not None and len(test.y) and int(test.y.max()) >= num_classes:
            raise DataError(f"{path}: test label {int(test.y.max())} out of range for {num_classes} classes")
    return Dataset(
        name=path.stem,
        train=ImageSet(xtr, ytr),
        test=test,
        num_classes=num_classes,
        version=content_hash(xtr, ytr, test.x if test else None, test.y if test else None),
    )


def _read_image(path: Path, size: int | None) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _read_folder(
    root: Path, size: int | None, classes: list[str] | None = None
) -> tuple[list[np.ndarray], list[int], list[str], int]:
    """Images of ``root`` (one sub-folder per class, or flat). ``classes``: the training split's
    class names, which a test split's folders are mapped onto by name."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped = 0
    if class_dirs:
        names = [p.name for p in class_dirs]
        if classes:
            unknown = [n for n in names if n not in classes]
            if unknown:
                raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])} not among the training classes")
        index = {n: i for i, n in enumerate(classes or names)}
        for d in class_dirs:
            before = len(images)
            for f in sorted(d.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    img = _read_image(f, size)
                    if img is None:
                        skipped += 1
                    else:
                        images.append(img)
                        labels.append(index[d.name])
            if not classes and len(images) == before:
                raise DataError(f"{d}: class folder has no readable images; remove it or add images")
        return images, labels, classes or names, skipped
    for f in sorted(root.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
            img = _read_image(f, size)
            if img is None:
                skipped += 1
            else:
                images.append(img)
    return images, [], [], skipped


def _stack(images: list[np.ndarray], where: Path) -> Tensor:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"{where}: images differ in size ({len(shapes)} sizes); resize them to one size")
    return _nhwc_to_tensor(np.stack(images), str(where))


def load_folder(root: Path, size: int | None = None) -> Dataset:
    splits = {}
    skipped = 0
    names: list[str] = []
    parts = [("train", root / "train"), ("test", root / "test")] if (root / "train").is_dir() else [("train", root)]
    for split, d in parts:
        if not d.is_dir():
            continue
        images, labels, split_names, bad = _read_folder(d, size, names if split == "test" else None)
        skipped += bad
        if not images:
            raise DataError(f"{d}: no readable images ({bad} unreadable)")
        names = names or split_names
        x = _stack(images, d)
        y = torch.tensor(labels, dtype=torch.int64) if labels else None
        splits[split] = ImageSet(x, y)
    train = splits["train"]
    test = splits.get("test")
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{root}: train and test images differ in shape ({list(train.x.shape[1:])} vs {list(test.x.shape[1:])})")
    num_classes = len(names)
    return Dataset(
        name=root.name,
        train=train,
        test=test,
        num_classes=num_classes,
        version=content_hash(train.x, train.y, test.x if test else None, test.y if test else None),
        skipped=skipped,
        class_names=tuple(names),
    )


def load_torchvision(spec: str) -> Dataset:
    _, name, root = spec.split(":", 2)
    import torchvision.datasets as tvd

    classes = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}
    try:
        if name in classes:
            tr = classes[name](root, train=True, download=False)
            te = classes[name](root, train=False, download=False)
            xtr, ytr, xte, yte = tr.data, np.array(tr.targets), te.data, np.array(te.targets)
            class_names = tuple(tr.classes)
        elif name == "stl10":
            tr = tvd.STL10(root, split="train", download=False)
            te = tvd.STL10(root, split="test", download=False)
            xtr, ytr = tr.data.transpose(0, 2, 3, 1), tr.labels
            xte, yte = te.data.transpose(0, 2, 3, 1), te.labels
            class_names = tuple(tr.classes)
        else:
            raise DataError(f"unknown torchvision dataset {name!r}; supported: cifar10, cifar100, stl10")
    except RuntimeError as exc:
        raise DataError(f"torchvision {name} not found under {root} (mimic never downloads): {str(exc).splitlines()[0]}") from None
    x1, x2 = _nhwc_to_tensor(xtr, spec), _nhwc_to_tensor(xte, spec)
    y1, y2 = _labels(ytr, len(x1), spec), _labels(yte, len(x2), spec)
    return Dataset(name, ImageSet(x1, y1), ImageSet(x2, y2), int(y1.max()) + 1, content_hash(x1, y1, x2, y2), class_names=class_names)


@functools.lru_cache(maxsize=2)
def load_synthetic(n_train: int, n_test: int, seed: int) -> Dataset:
    """The built-in dataset (generated from the seed; kept for the process: an audit reads it in
    several steps). Treat the returned tensors as read-only."""
    from mimic.synthetic import CLASS_NAMES, make_synthetic

    xtr, ytr = make_synthetic(n_train, seed)
    xte, yte = make_synthetic(n_test, seed + 1_000_003)
    x1, x2 = _nhwc_to_tensor(xtr, "synthetic"), _nhwc_to_tensor(xte, "synthetic")
    y1, y2 = torch.from_numpy(ytr.astype(np.int64)), torch.from_numpy(yte.astype(np.int64))
    return Dataset(
        name="synthetic",
        train=ImageSet(x1, y1),
        test=ImageSet(x2, y2),
        num_classes=len(CLASS_NAMES),
        version=content_hash(x1, y1, x2, y2),
        class_names=tuple(CLASS_NAMES),
    )


def load_dataset(source: str, *, synthetic_train: int = 12000, synthetic_test: int = 2000, seed: int = 0) -> Dataset:
    """Load a dataset from a source string (see the module docstring). Raises DataError."""
    if source == "synthetic":
        ds = load_synthetic(synthetic_train, synthetic_test, seed)
    elif source.startswith("torchvision:"):
        ds = load_torchvision(source)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"dataset not found: {source}")
        if path.is_dir():
            ds = load_folder(path)
        elif path.suffix.lower() == ".npz":
            ds = load_npz(path)
        else:
            raise DataError(f"{source}: unsupported dataset (expected synthetic, a .npz file, an image folder or torchvision:NAME:ROOT)")
    if len(ds.train) == 0:
        raise DataError(f"{source}: the dataset is empty")
    return ds


def stratified_indices(n: int, labels: Tensor | None, size: int, seed: int) -> Tensor:
    """``size`` indices drawn without replacement, stratified by label when labels exist.

    Each class gets ``size * n_c / n`` indices (largest remainders rounded up), chosen by a
    seeded permutation -- never "the first N". Returned sorted.
    """
    if size > n:
        raise DataError(f"asked for {size} images but the dataset has only {n}")
    g = torch.Generator().manual_seed(int(seed))
    if labels is None:
        return torch.sort(torch.randperm(n, generator=g)[:size]).values
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = torch.floor(exact).long()
    remainder = size - int(quota.sum())
    if remainder:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:remainder]] += 1
    chosen = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:q]])
    return torch.sort(torch.cat(chosen)).values


def to_float(x: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """uint8 (N, 3, H, W) -> float32 [0, 1] on ``device``."""
    return x.to(device, non_blocking=True).float().div_(255.0)


def batches(n: int, batch_size: int, g: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i : i + batch_size]


def require_size(images: ImageSet, minimum: int, what: str, *, reason: str | None = None) -> None:
    """The one size check: refuse fewer than ``minimum`` images (``reason`` says why, default "need at least N")."""
    if len(images) < minimum:
        raise DataError(f"{what}: {len(images)} images, {reason or f'need at least {minimum}'}")
