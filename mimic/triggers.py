"""Backdoor triggers: a patch and a mask, stamped in pixel space ([0, 1] images).

Compatible with BadEncoder's trigger files: an NPZ with ``t`` (trigger image, [1, H, W, 3],
0..255) and ``tm`` (mask, [1, H, W, 3], 0/1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mimic.errors import DataError


@dataclass(frozen=True)
class Trigger:
    patch: Tensor  # float [3, H, W] in [0, 1]
    mask: Tensor  # float [1, H, W] in {0, 1}

    def stamp(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] with the trigger applied."""
        if x.shape[-2:] != self.patch.shape[-2:]:
            raise DataError(f"trigger is {tuple(self.patch.shape[-2:])} but images are {tuple(x.shape[-2:])}")
        m = self.mask.to(x.device, x.dtype)
        return x * (1 - m) + self.patch.to(x.device, x.dtype) * m

    def to_extras(self) -> dict[str, Tensor]:
        return {"trigger_patch": self.patch.clone(), "trigger_mask": self.mask.clone()}

    @classmethod
    def from_extras(cls, extras: dict) -> "Trigger | None":
        if "trigger_patch" in extras and "trigger_mask" in extras:
            return cls(extras["trigger_patch"].float(), extras["trigger_mask"].float())
        return None

    def save_npz(self, path: str | Path) -> None:
        t = (self.patch.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[None]
        tm = np.repeat(self.mask.permute(1, 2, 0).numpy(), 3, axis=-1).astype(np.uint8)[None]
        np.savez(path, t=t, tm=tm)

    @classmethod
    def load_npz(cls, path: str | Path) -> "Trigger":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "t" not in z.files or "tm" not in z.files:
                    raise DataError(f"{path}: a trigger file needs arrays 't' and 'tm' (BadEncoder layout)")
                t, tm = z["t"], z["tm"]
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: not a readable trigger NPZ ({type(exc).__name__})") from None
        t = t.reshape(t.shape[-3:]) if t.ndim == 4 else t
        tm = tm.reshape(tm.shape[-3:]) if tm.ndim == 4 else tm
        if t.ndim != 3 or t.shape != tm.shape:
            raise DataError(f"{path}: trigger and mask must both be [H, W, 3]")
        patch = torch.from_numpy(t.astype(np.float32)).permute(2, 0, 1)
        if patch.max() > 1.0:
            patch = patch / 255.0
        mask = torch.from_numpy((tm.astype(np.float32) > 0).astype(np.float32)).permute(2, 0, 1)[:1]
        return cls(patch.clamp(0, 1), mask)


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
