"""The teacher fingerprint is a content hash: format- and key-order-invariant, weight-sensitive."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import save_file

from mimic.checkpoints import save_encoder
from mimic.encoders import CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderSpec
from mimic.fingerprint import fingerprint_encoder, fingerprint_file, fingerprint_state_dict

RESEARCH = {"conv1": "f.f.0", "bn1": "f.f.1", "layer1": "f.f.3", "layer2": "f.f.4",
            "layer3": "f.f.5", "layer4": "f.f.6"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(width: int = 4, seed: int = 0, **spec_kw) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(EncoderSpec(width=width, **spec_kw)).eval()


def fp_sd(sd: dict, arch: str, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> str:
    return fingerprint_state_dict(sd, arch, mean=mean, std=std)


def shuffled(d: dict, seed: int = 1) -> dict:
    items = list(d.items())
    random.Random(seed).shuffle(items)
    return dict(items)


def test_invariant_across_formats_and_key_order(tmp_path):
    enc = make_encoder()
    want = fingerprint_encoder(enc)
    sd = {k: v.clone() for k, v in enc.backbone.state_dict().items()}

    save_encoder(tmp_path / "ours.pt", enc)
    save_encoder(tmp_path / "ours.safetensors", enc)
    research = {f"{RESEARCH[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    research["g.0.weight"] = torch.randn(4, 4)
    torch.save({"state_dict": shuffled({f"module.{k}": v for k, v in research.items()})}, tmp_path / "research.pt")
    torch.save(dict(reversed(list(sd.items()))) | {"fc.weight": torch.randn(10, 32)}, tmp_path / "tv.pt")
    save_file({k: v.contiguous() for k, v in shuffled(research, 2).items()}, str(tmp_path / "research.safetensors"))

    for name in ("ours.pt", "ours.safetensors", "research.pt", "tv.pt", "research.safetensors"):
        assert fingerprint_file(tmp_path / name) == want, name
    assert fingerprint_file(tmp_path / "tv.pt", spec=EncoderSpec(width=4)) == want
    assert fp_sd(shuffled(sd), "cifar_resnet18-w4") == want


def test_changes_with_one_element():
    enc = make_encoder()
    sd = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    before = fp_sd(sd, "cifar_resnet18-w4")
    sd["layer4.1.conv2.weight"].view(-1)[17] += 1e-6
    assert fp_sd(sd, "cifar_resnet18-w4") != before


def test_differs_across_widths_and_arch_names():
    a, b = make_encoder(width=4), make_encoder(width=8)
    assert fingerprint_encoder(a) != fingerprint_encoder(b)
    sd = a.backbone.state_dict()
    assert fp_sd(sd, "cifar_resnet18-w4") != fp_sd(sd, "other")


def test_dtype_is_part_of_it():
    t = {"w": torch.ones(4)}
    assert fp_sd(t, "x") != fp_sd({"w": torch.ones(4, dtype=torch.float64)}, "x")
    assert fp_sd(t, "x") != fp_sd({"w": torch.ones(2, 2)}, "x")


def test_normalisation_is_part_of_it_counters_are_not():
    a = make_encoder(seed=3)
    b = make_encoder(seed=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert fingerprint_encoder(a) != fingerprint_encoder(b)
    sd = a.backbone.state_dict()
    base = fp_sd(sd, "x")
    assert fp_sd(sd, "x", mean=(0.4914, 0.4822, 0.4466)) != base  # one value, last digit
    assert fp_sd(sd, "x", std=(0.2023, 0.1994, 0.2011)) != base
    assert fp_sd(sd, "x", mean=CIFAR10_STD, std=CIFAR10_MEAN) != base  # mean and std are not interchangeable
    c = make_encoder(seed=3)
    c.backbone.bn1.num_batches_tracked.fill_(123)
    assert fingerprint_encoder(c) == fingerprint_encoder(a)


def test_files_differing_only_in_normalisation_differ(tmp_path):
    """Issue 12 point 6: the same weights with other statistics compute other features."""
    a = make_encoder(seed=5)
    b = make_encoder(seed=5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    save_encoder(tmp_path / "a.pt", a)
    save_encoder(tmp_path / "b.pt", b)
    save_encoder(tmp_path / "b.safetensors", b)
    assert fingerprint_file(tmp_path / "a.pt") != fingerprint_file(tmp_path / "b.pt")
    assert fingerprint_file(tmp_path / "b.pt") == fingerprint_file(tmp_path / "b.safetensors") == fingerprint_encoder(b)
    # an imported layout carries no statistics: the ones it is loaded with are fingerprinted
    torch.save(a.backbone.state_dict(), tmp_path / "tv.pt")
    assert fingerprint_file(tmp_path / "tv.pt") == fingerprint_encoder(a)
    assert fingerprint_file(tmp_path / "tv.pt", spec=b.spec) == fingerprint_encoder(b)



def test_is_sha256_hex():
    fp = fingerprint_encoder(make_encoder())
    assert len(fp) == 64 and int(fp, 16) >= 0
