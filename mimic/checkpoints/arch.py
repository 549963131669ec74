"""Architecture inference from canonical key names and shapes (no tensor data is read)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mimic.checkpoints.messages import names
from mimic.encoders import EncoderSpec
from mimic.errors import CheckpointError

SUPPORTED = "cifar_resnet18 (any width), cifar_resnet50, resnet18, resnet50"
_KNOWN_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
_BLOCK = re.compile(r"^layer([1-4])\.(\d{1,6})\.")


def describe_net(state_dict: Mapping[str, Tensor]) -> tuple[str, tuple[int, ...], str | None]:
    """(block kind, blocks per stage, known torchvision name or None) from key names."""
    blocks: dict[int, set[int]] = {s: set() for s in range(1, 5)}
    bottleneck = False
    for key in state_dict:
        hit = _BLOCK.match(key)
        if hit:
            blocks[int(hit.group(1))].add(int(hit.group(2)))
            bottleneck = bottleneck or key[hit.end() :].startswith("conv3.")
    counts = tuple(max(b) + 1 if b else 0 for b in blocks.values())
    kind = "bottleneck" if bottleneck else "basic"
    return kind, counts, _KNOWN_RESNETS.get((kind, counts))


def _unsupported(kind: str, counts: tuple[int, ...], known: str | None, style: str = "") -> ValueError:
    name = known or f"{kind}-block ResNet with {'-'.join(map(str, counts))} blocks"
    return ValueError(f"unsupported architecture: {style}{name}; supported: {SUPPORTED}")


def infer(state_dict: Mapping[str, Tensor]) -> EncoderSpec:
    """infer_spec raising ValueError (message without a file name)."""
    w = state_dict.get("conv1.weight")
    if not isinstance(w, Tensor):
        raise ValueError(f"unknown layout: no conv1.weight (keys: {names(sorted(state_dict)) or 'none'})")
    shape = tuple(w.shape)
    kind, counts, known = describe_net(state_dict)
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"unsupported architecture: conv1.weight has shape {list(shape)[:8]}, expected [C, 3, k, k]")
    if shape[0] < 1:
        raise ValueError("unsupported architecture: conv1.weight has no output channels")
    if shape[2:] == (3, 3):
        if kind == "bottleneck":
            if shape[0] != 64 or any(c > m for c, m in zip(counts, (3, 4, 6, 3))):
                raise _unsupported(kind, counts, known, "a CIFAR-style ")
            return EncoderSpec(arch="cifar_resnet50")
        if any(c > 2 for c in counts):
            raise _unsupported(kind, counts, known, "a CIFAR-style ")
        return EncoderSpec(arch="cifar_resnet18", width=int(shape[0]))
    if shape[2:] == (7, 7):
        if shape[0] != 64:
            raise ValueError(f"unsupported architecture: 7x7 conv1 with {shape[0]} channels (resnet18/50 use 64)")
        arch = "resnet50" if kind == "bottleneck" else "resnet18"
        if any(c > m for c, m in zip(counts, (3, 4, 6, 3) if arch == "resnet50" else (2, 2, 2, 2))):
            raise _unsupported(kind, counts, known)
        return EncoderSpec(arch=arch)
    raise ValueError(f"unsupported architecture: conv1 kernel {shape[2]}x{shape[3]}")


def infer_spec(state_dict: Mapping[str, Tensor]) -> EncoderSpec:
    """Architecture and width from canonical key names and shapes (CIFAR-10 normalisation)."""
    try:
        return infer(state_dict)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None

