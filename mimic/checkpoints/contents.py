"""What a file says besides its weights, validated at load: normalisation, mimic's extras, meta.

Everything a later stage reads from a model file is checked here, once, so that a wrongly typed
value is a one-line refusal of that file and never a ValueError/AttributeError deep in an audit:

* normalisation ``mean``/``std``: exactly one finite value per input channel (3), ``|mean| <= 1``,
  ``0.01 <= std <= 10`` (images are in [0, 1]; this admits ImageNet, CIFAR, CLIP, 0.5/0.5, 0/1);
* ``target_class``: an integer (or a one-element integer tensor) in ``[0, 100000)``;
* ``trigger_patch`` [3, H, W] and ``trigger_mask`` [1, H, W]: dense float tensors with values in
  [0, 1] (the mask may also be bool), the same H and W (at most 4096), always both or neither;
* ``trigger_placement``: ``"fixed"`` or ``"random"`` (the trigger moves to a random place per image);
* ``reference_images`` [N, 3, H, W]: uint8, or float in [0, 1];
* ``meta``: plain data only (no tensors), bounded depth, no cycles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mimic.checkpoints.walk import WalkError, walk
from mimic.errors import ConfigError

MEAN_RANGE = (-1.0, 1.0)
STD_RANGE = (0.01, 10.0)
MAX_CLASSES = 100_000
MAX_SIDE = 4096
CHANNELS = 3
_PLAIN_SCALARS = (str, int, float, bool, type(None), bytes, bytearray, complex)
_PLAIN_TORCH = (torch.dtype, torch.device)


def normalisation(values: Any, what: str) -> tuple[float, float, float]:
    """``values`` as one float per channel within range; ValueError (message without a file name) otherwise."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise ValueError(f"{what} must be {CHANNELS} numbers (one per channel), got {type(values).__name__}")
    if len(values) != CHANNELS:
        raise ValueError(f"{what} must be {CHANNELS} numbers (one per channel), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what} must be {CHANNELS} numbers, got a {type(v).__name__}")
        out.append(float(v))
    lo, hi = MEAN_RANGE if what == "mean" else STD_RANGE
    bad = [v for v in out if not (math.isfinite(v) and lo <= v <= hi)]
    if bad:
        rule = "finite, within [-1, 1]" if what == "mean" else "finite, within [0.01, 10] (std > 0)"
        raise ValueError(f"{what} values must be {rule}, got {out}")
    return out[0], out[1], out[2]


def check_normalisation(mean: Any, std: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Caller-supplied ``mean``/``std`` (``load_encoder(mean=..., std=...)``): ConfigError if invalid."""
    try:
        return normalisation(mean, "mean"), normalisation(std, "std")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _dense(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"extras[{name!r}] must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_meta or t.is_quantized or getattr(t, "is_nested", False):
        raise ValueError(f"extras[{name!r}] must be a dense tensor with data")
    return t


def _image_tensor(t: Any, name: str, channels: int, lead: bool) -> Tensor:
    t = _dense(t, name)
    shape = list(t.shape)
    want = "[N, 3, H, W]" if lead else f"[{channels}, H, W]"
    body = shape[1:] if lead else shape
    if len(shape) != (4 if lead else 3) or body[0] != channels or (lead and shape[0] < 1):
        raise ValueError(f"extras[{name!r}] must have shape {want}, got {shape}")
    if not (1 <= body[1] <= MAX_SIDE and 1 <= body[2] <= MAX_SIDE):
        raise ValueError(f"extras[{name!r}] has an image size of {body[1]}x{body[2]} (1..{MAX_SIDE} per side)")
    return t


def _unit_range(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"extras[{name!r}] must be a float tensor, got {str(t.dtype).replace('torch.', '')}")
    if t.numel() and not bool(torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1):
        raise ValueError(f"extras[{name!r}] values must be finite and within [0, 1]")


def _target_class(value: Any) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"extras['target_class'] must be an integer, got a {list(value.shape)} {value.dtype} tensor")
        value = int(_dense(value, "target_class").reshape(-1)[0])
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"extras['target_class'] must be an integer, got {type(value).__name__}")
    if not 0 <= value < MAX_CLASSES:
        raise ValueError(f"extras['target_class'] must be a class index in [0, {MAX_CLASSES}), got {value}")
    return value


def validate_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    """mimic's own extras checked (ValueError naming the key); other keys pass unchanged."""
    out = dict(extras)
    if "target_class" in out:
        out["target_class"] = _target_class(out["target_class"])
    has_patch, has_mask = "trigger_patch" in out, "trigger_mask" in out
    if has_patch != has_mask:
        raise ValueError("extras hold " + ("trigger_patch without trigger_mask" if has_patch else "trigger_mask without trigger_patch"))
    if has_patch:
        patch = _image_tensor(out["trigger_patch"], "trigger_patch", 3, lead=False)
        mask = _image_tensor(out["trigger_mask"], "trigger_mask", 1, lead=False)
        if patch.shape[1:] != mask.shape[1:]:
            raise ValueError(f"extras trigger_patch {list(patch.shape)} and trigger_mask {list(mask.shape)} differ in size")
        _unit_range(patch, "trigger_patch")
        if mask.dtype != torch.bool:
            _unit_range(mask, "trigger_mask")
    if "trigger_placement" in out and out["trigger_placement"] not in ("fixed", "random"):
        raise ValueError("extras['trigger_placement'] must be 'fixed' or 'random'")
    if "reference_images" in out:
        ref = _image_tensor(out["reference_images"], "reference_images", 3, lead=True)
        if ref.dtype != torch.uint8:
            _unit_range(ref, "reference_images")
    return out


def check_plain(obj: Any, where: str, allow_tensors: bool, max_depth: int = 64) -> None:
    """ConfigError unless ``obj`` is made of plain containers, scalars (and tensors if allowed)."""
    try:
        for path, value, is_key in walk(obj, where, max_depth):
            if is_key:
                if not isinstance(value, (str, int)):
                    raise ConfigError(f"{path} has a non-string key {value!r}"[:200])
            elif isinstance(value, Tensor):
                if not allow_tensors:
                    raise ConfigError(f"{path} is a tensor; put tensors in extras, not meta")
            elif not isinstance(value, _PLAIN_SCALARS + _PLAIN_TORCH):
                raise ConfigError(
                    f"{path} is a {type(value).__module__}.{type(value).__qualname__}, not plain data "
                    "(use str/int/float/bool/None, lists, dicts or tensors)"
                )
    except WalkError as exc:
        raise ConfigError(str(exc)) from None
