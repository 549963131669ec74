"""Encoder architectures, stage taps and projection heads.

Every encoder maps images in [0, 1] (N, 3, H, W) to a feature vector; the input normalisation the
encoder was trained with is part of the module (a fixed, non-persistent buffer), so triggers are
stamped in pixel space and every caller feeds the same thing.

Architectures (names used in configs and checkpoint metadata):

* ``cifar_resnet18`` -- the CIFAR variant used by SimCLR / BadEncoder / MIMIC: 3x3 stride-1 conv1,
  no max-pool, four stages of BasicBlocks, global average pool; 512-d at ``width=64``. ``width``
  scales every stage (width 16 gives a 128-d feature and runs ~10x faster on a CPU).
* ``resnet18`` / ``resnet50`` -- torchvision's ImageNet networks with the classifier removed.
* ``cifar_resnet50`` -- torchvision's ResNet-50 with the CIFAR stem (3x3 stride-1 conv1, no
  max-pool), as SimCLR-style CIFAR code trains it; 2048-d features.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so stages are
tapped by module path and plain torchvision state dicts load as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mimic.errors import ConfigError

ARCHITECTURES = ("cifar_resnet18", "cifar_resnet50", "resnet18", "resnet50")
STAGES = ("layer1", "layer2", "layer3", "layer4")

# BadEncoder / MIMIC train on CIFAR-10 with these statistics; they are the default normalisation
# for imported research checkpoints.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder: stored as plain metadata next to the weights."""

    arch: str = "cifar_resnet18"
    width: int = 64
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.width < 1:
            raise ConfigError(f"encoder width must be >= 1, got {self.width}")
        if self.arch != "cifar_resnet18" and self.width != 64:
            raise ConfigError(f"{self.arch} has a fixed width; width={self.width} applies to cifar_resnet18 only")

    @property
    def name(self) -> str:
        return f"{self.arch}-w{self.width}" if self.arch == "cifar_resnet18" else self.arch

    def to_meta(self) -> dict:
        return {"arch": self.arch, "width": self.width, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: dict) -> "EncoderSpec":
        return cls(
            arch=str(meta["arch"]),
            width=int(meta.get("width", 64)),
            mean=tuple(float(v) for v in meta.get("mean", CIFAR10_MEAN)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in meta.get("std", CIFAR10_STD)),  # type: ignore[arg-type]
        )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same module names, parameter order and forward), defined here so
    that building a CIFAR encoder does not import torchvision (2-3 s of start-up for every command).

    The forward keeps torchvision's operation order on purpose: autograd sums the gradient
    contributions of a tensor used several times (a block's input feeds conv1 and the shortcut; with
    MIMIC's attention loss a stage output is used three times) in the order the operations ran, so
    another order gives (slightly) different training runs. With this order training is
    bit-identical to torchvision's block (tests/test_encoders.py)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)  # after the main branch, as torchvision
        out += identity
        return self.relu(out)


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (conv1 3x3 stride 1, no max-pool), width multiplier ``width``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._stage(width, stride=1)
        self.layer2 = self._stage(2 * width, stride=2)
        self.layer3 = self._stage(4 * width, stride=2)
        self.layer4 = self._stage(8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 8 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        blocks = [BasicBlock(self._inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self._inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class Encoder(nn.Module):
    """Input normalisation + backbone. ``forward`` takes images in [0, 1] and returns features."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.arch == "cifar_resnet18":
            self.backbone: nn.Module = CifarResNet18(spec.width)
            self.feature_dim = 8 * spec.width
        else:
            from torchvision.models import resnet18, resnet50  # ImageNet architectures only

            net = resnet18(weights=None) if spec.arch == "resnet18" else resnet50(weights=None)
            if spec.arch == "cifar_resnet50":  # the CIFAR stem: 3x3 stride-1 conv1, no max-pool
                net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
                net.maxpool = nn.Identity()
            self.feature_dim = net.fc.in_features
            net.fc = nn.Identity()
            self.backbone = net
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean) / self.std)

    def stage_paths(self) -> tuple[str, ...]:
        """Module paths of the tapped stages, relative to this module."""
        return tuple(f"backbone.{s}" for s in STAGES)


def make_student(teacher: Encoder, init: str, seed: int) -> Encoder:
    """The student: the teacher's architecture with fresh weights (``empty``, MIMIC) or a copy (``teacher``)."""
    import copy

    from mimic.runtime import seed_torch

    if init == "teacher":
        student = copy.deepcopy(teacher)
    else:
        seed_torch(seed, "student-init")
        student = build_encoder(teacher.spec)
    student.requires_grad_(True)
    return student


def build_encoder(spec: EncoderSpec) -> Encoder:
    return Encoder(spec)


class ProjectionHead(nn.Sequential):
    """SimCLR head g: Linear(d, d, no bias) - BN - ReLU - Linear(d, out). Names match ``g.*``."""

    def __init__(self, dim: int, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, out_dim),
        )


class StageTaps:
    """Forward hooks on modules named by path; registered once, removed by ``remove()``.

    Use as a context manager so the hooks never outlive the run::

        with StageTaps(encoder, encoder.stage_paths()) as taps:
            z = encoder(x)
            h = taps.outputs  # {path: Tensor}
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.outputs: dict[str, Tensor] = {}
        self._handles = []
        try:
            for path in self.paths:
                module = model.get_submodule(path)
                self._handles.append(module.register_forward_hook(self._hook(path)))
        except AttributeError as exc:
            self.remove()
            raise ConfigError(f"cannot tap stage {path!r}: {exc}") from None

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.outputs[path] = output

        return hook

    def take(self) -> list[Tensor]:
        """The latest output of every tapped stage, in path order; clears the buffer."""
        missing = [p for p in self.paths if p not in self.outputs]
        if missing:
            raise RuntimeError(f"stages not reached by the forward pass: {missing}")
        out = [self.outputs[p] for p in self.paths]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs = {}

    def __enter__(self) -> "StageTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward hooks registered anywhere in ``model`` (used to prove none leak)."""
    return sum(len(m._forward_hooks) for m in model.modules())


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher: eval mode and no parameter takes a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def bn_eval(module: nn.Module) -> None:
    """Put a BatchNorm layer in eval mode (``model.apply(bn_eval)``): fine-tuning on a small or
    partly triggered set (the attacks, unlearning, fine-pruning) keeps the running statistics of the
    encoder's pre-training, as BadEncoder's code does."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.eval()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in eval mode (restoring its previous mode) under no_grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
