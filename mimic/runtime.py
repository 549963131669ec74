"""Seeds, devices and precision: the one place that decides them.

Every random stream in mimic is a ``torch.Generator`` derived from (run seed, purpose, epoch), so a
run resumed at epoch k draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from mimic.errors import ConfigError


def derive_seed(seed: int, *salt: object) -> int:
    """A 63-bit seed derived from the run seed and a purpose, e.g. ``derive_seed(0, "distill", 3)``."""
    blob = repr((int(seed),) + tuple(str(s) for s in salt)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *salt: object, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *salt))
    return g


def seed_torch(seed: int, *salt: object) -> None:
    """Seed torch's global stream (parameter initialisation, dropout) for one purpose."""
    torch.manual_seed(derive_seed(seed, *salt))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ConfigError(f"unknown precision {precision!r}")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
