from __future__ import annotations

import pytest
import torch

from mimic.data import ImageSet
from mimic.errors import DataError
from mimic.evaluate import accuracy, attack_success_rate, evaluate_encoder, extract_features
from mimic.triggers import white_patch


def test_asr_excludes_target_class_images():
    labels = torch.tensor([0, 0, 1, 2, 3])
    pred = torch.tensor([0, 0, 0, 0, 1])  # target 0: both target-class images "succeed" trivially
    assert attack_success_rate(pred, labels, target=0) == pytest.approx(200 / 3)
    # the authors' way (counting target-class images) would report 80%
    assert 100 * float((pred == 0).float().mean()) == pytest.approx(80.0)


def test_asr_undefined_when_only_target_class():
    with pytest.raises(DataError):
        attack_success_rate(torch.tensor([0]), torch.tensor([0]), 0)


def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 50.0


def test_features_are_l2_normalised(tiny_encoder, tiny_images):
    f = extract_features(tiny_encoder, tiny_images.x, batch_size=16)
    assert f.shape == (64, 32) and torch.allclose(f.norm(dim=1), torch.ones(64), atol=1e-5)


def test_evaluate_encoder_reports_ca_and_asr(tiny_encoder, tiny_images):
    train = tiny_images
    test = ImageSet(tiny_images.x[:32], tiny_images.y[:32])
    res = evaluate_encoder(tiny_encoder, train, test, 4, probes=("linear", "mlp"), trigger=white_patch(), target=1, epochs=3)
    assert [r.probe for r in res] == ["linear", "mlp"]
    for r in res:
        assert 0 <= r.ca <= 100 and r.asr is not None and 0 <= r.asr <= 100
    assert evaluate_encoder(tiny_encoder, train, test, 4, epochs=1)[0].asr is None
