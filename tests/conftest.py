"""Shared fixtures: tiny encoders and datasets so the fast suite stays fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mimic.config import load_config
from mimic.data import ImageSet
from mimic.encoders import Encoder, EncoderSpec, build_encoder

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


@pytest.fixture
def tiny_spec() -> EncoderSpec:
    return EncoderSpec(arch="cifar_resnet18", width=4)


@pytest.fixture
def tiny_encoder(tiny_spec: EncoderSpec) -> Encoder:
    torch.manual_seed(0)
    return build_encoder(tiny_spec).eval()


@pytest.fixture
def tiny_images() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 4
    return ImageSet(x, y)


@pytest.fixture
def tiny_config():
    return load_config(profile="tiny")


def write_npz(path: Path, n_train: int = 200, n_test: int = 100, classes: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=(np.arange(n_train) % classes).astype(np.int64),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=(np.arange(n_test) % classes).astype(np.int64),
    )
    return path
