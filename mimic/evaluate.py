"""Downstream evaluation: frozen L2-normalised features, a probe, clean accuracy and ASR.

* CA: accuracy of the probe on the clean test set.
* ASR: share of **triggered** test images whose true class is **not** the target class that the
  probe assigns to the target class. (The authors' script counts target-class images too, which
  inflates ASR by up to 1/num_classes; we exclude them.)

Two probe protocols, each with a linear and an MLP probe:

* ``raw`` (the standard, BadEncoder's protocol): the probe sees the L2-normalised features
  themselves. They are multiplied by the constant sqrt(d) so that one learning rate suits every
  feature width; a global constant changes nothing a probe can express.
* ``zscore`` (an extra): each dimension standardised with the probe's training features. It
  re-weights the dimensions, and a backdoor that lives in a few high-variance directions can look
  weaker through it (an independent full-width BadEncoder teacher scored ASR 100 raw but 33-67
  z-scored), so verdicts take the worst case over the protocols run (:mod:`mimic.results`).

Every encoder compared gets the same recipe: same labelled data, same probes, same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimic.data import ImageSet, batches, to_float
from mimic.encoders import Encoder, evaluating
from mimic.errors import DataError
from mimic.runtime import generator, seed_torch
from mimic.triggers import Trigger


def extract_features(
    encoder: Encoder, x: Tensor, *, trigger: Trigger | None = None, batch_size: int = 512, device: torch.device | str = "cpu"
) -> Tensor:
    """L2-normalised features of uint8 images ``x`` (optionally triggered), on the CPU."""
    out = []
    with evaluating(encoder):
        encoder.to(device)
        for idx in batches(len(x), batch_size):
            xb = to_float(x[idx], device)
            if trigger is not None:
                xb = trigger.stamp(xb)
            out.append(F.normalize(encoder(xb).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def make_probe(kind: str, dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":  # the authors' downstream classifier: 512-512-256-C with dropout .5
        return nn.Sequential(
            nn.Linear(dim, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, num_classes)
        )
    raise ValueError(f"unknown probe {kind!r}")


PROTOCOLS = ("raw", "zscore")


def probe_name(kind: str, protocol: str) -> str:
    """``linear``/``mlp`` for the standard protocol, ``linear_z``/``mlp_z`` for the z-scored one."""
    return kind if protocol == "raw" else f"{kind}_z"


class Scale(nn.Module):
    """Multiply by a constant (sqrt(d) for unit-norm features: unit mean square per dimension)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class Standardise(nn.Module):
    """Per-dimension z-scoring with statistics of the probe's training features.

    An invertible affine map, so it changes nothing a linear probe can express; it only
    conditions the optimisation (L2-normalised features have a tiny per-dimension scale).
    """

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", features.mean(0))
        self.register_buffer("std", features.std(0) + 1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def train_probe(
    features: Tensor, labels: Tensor, num_classes: int, *, kind: str = "linear", protocol: str = "raw", epochs: int = 100,
    lr: float = 1e-2, batch_size: int = 512, seed: int = 0,
) -> nn.Module:
    """A ``kind`` probe (linear | mlp) under ``protocol`` (raw | zscore), Adam with cosine decay."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown probe protocol {protocol!r}")
    seed_torch(seed, "probe-init", kind)
    pre = Scale(features.shape[1] ** 0.5) if protocol == "raw" else Standardise(features)
    probe = nn.Sequential(pre, make_probe(kind, features.shape[1], num_classes))
    opt = torch.optim.Adam(probe.parameters(), lr=lr if kind == "linear" else lr / 10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    probe.train()
    for epoch in range(epochs):
        g = generator(seed, "probe", kind, epoch)
        for idx in batches(len(features), batch_size, g):
            loss = F.cross_entropy(probe(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Module, features: Tensor) -> Tensor:
    return probe(features).argmax(dim=1)


def attack_success_rate(pred_triggered: Tensor, labels: Tensor, target: int) -> float:
    """% of triggered non-target-class images predicted as ``target``."""
    keep = labels != target
    if not bool(keep.any()):
        raise DataError("ASR undefined: every test image belongs to the target class")
    return 100.0 * float((pred_triggered[keep] == target).float().mean())


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return 100.0 * float((pred == labels).float().mean())


@dataclass(frozen=True)
class EvalResult:
    probe: str  # probe_name(kind, protocol)
    ca: float
    asr: float | None
    kind: str = "linear"
    protocol: str = "raw"

    def to_dict(self) -> dict:
        return {"probe": self.probe, "kind": self.kind, "protocol": self.protocol, "ca": round(self.ca, 2),
                "asr": None if self.asr is None else round(self.asr, 2)}


def evaluate_encoder(
    encoder: Encoder,
    train: ImageSet,
    test: ImageSet,
    num_classes: int,
    *,
    probes: tuple[str, ...] = ("linear",),
    protocols: tuple[str, ...] = ("raw",),
    trigger: Trigger | None = None,
    target: int | None = None,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[EvalResult]:
    """CA (and ASR when a trigger and target are given) of ``encoder`` for each probe kind and protocol."""
    if train.y is None or test.y is None:
        raise DataError("evaluation needs labelled train and test images")
    if len(train) < num_classes or len(test) == 0:
        raise DataError(f"evaluation needs at least {num_classes} labelled train images and one test image")
    f_train = extract_features(encoder, train.x, device=device)
    f_test = extract_features(encoder, test.x, device=device)
    f_trig = None
    keep = None
    if trigger is not None and target is not None:
        keep = test.y != target
        f_trig = extract_features(encoder, test.x[keep], trigger=trigger, device=device)
    results = []
    for protocol in protocols:
        for kind in probes:
            probe = train_probe(f_train, train.y, num_classes, kind=kind, protocol=protocol, epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed)
            ca = accuracy(predict(probe, f_test), test.y)
            asr = None
            if f_trig is not None and keep is not None and target is not None:
                asr = attack_success_rate(predict(probe, f_trig), test.y[keep], target)
            results.append(EvalResult(probe_name(kind, protocol), ca, asr, kind, protocol))
    return results
