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


def test_both_protocols_name_their_probes(tiny_encoder, tiny_images):
    test = ImageSet(tiny_images.x[:32], tiny_images.y[:32])
    res = evaluate_encoder(tiny_encoder, tiny_images, test, 4, probes=("linear", "mlp"), protocols=("raw", "zscore"),
                           trigger=white_patch(), target=1, epochs=2)
    assert [(r.probe, r.kind, r.protocol) for r in res] == [
        ("linear", "linear", "raw"), ("mlp", "mlp", "raw"), ("linear_z", "linear", "zscore"), ("mlp_z", "mlp", "zscore")]


class HiddenBackdoor(torch.nn.Module):
    """An encoder whose backdoor hides from z-scored probes.

    Features: 4 class dimensions (which horizontal band of the top half is bright) and 40 near-constant
    nuisance dimensions. The trigger (a white bottom-right patch) moves the class dimensions onto the
    target class's, and the nuisance dimensions by an amount that is small in raw scale but ~300
    standard deviations of their clean variation, in a random direction per image. A raw probe sees
    a target-class image; a z-scored probe sees a huge shift along directions it never learned, so its
    predictions scatter over the classes.
    """

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = torch.stack([x[:, :, 4 * c : 4 * c + 4, :16].mean((1, 2, 3)) for c in range(4)], 1)
        evidence = torch.softmax(20 * bands, 1)
        s = ((x[:, :, 21:31, 21:31].mean((1, 2, 3)) - 0.8) * 10).clamp(0, 1)[:, None]  # 1 on the trigger
        onehot = torch.nn.functional.one_hot(torch.tensor(self.target), 4).float()
        evidence = (1 - s) * evidence + s * onehot
        g = torch.Generator().manual_seed(int(x.sum().item() * 1000) % 2**31)
        shift = torch.where(torch.rand(len(x), 40, generator=g) < 0.5, -1.0, 1.0)
        nuisance = 1.0 + 0.001 * torch.randn(len(x), 40, generator=g) + s * 0.3 * shift
        return torch.cat([3 * evidence, nuisance], 1)


def banded_images(n: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 90, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    for c in range(4):
        x[y == c, :, 4 * c : 4 * c + 4, :16] = 230
    return ImageSet(x, y)


def test_a_backdoor_that_the_z_scored_probe_misses_is_still_caught():
    """Issue 13.5: the verdict takes the worst case over the protocols, so hiding from one is not enough."""
    from mimic.config import load_config
    from mimic.gate import judge
    from mimic.results import worst_case

    enc, train, test = HiddenBackdoor(target=2), banded_images(400, 0), banded_images(200, 1)
    res = {r.probe: r for r in evaluate_encoder(enc, train, test, 4, protocols=("raw", "zscore"), trigger=white_patch(),
                                                target=2, epochs=30, batch_size=64, seed=0)}
    assert res["linear"].ca > 95 and res["linear_z"].ca > 95  # both probes learned the classes
    assert res["linear"].asr > 90  # the standard protocol sees the backdoor
    assert res["linear_z"].asr < 50  # the z-scored one sees a fraction of it (chance level: 1/4 of the classes)
    gate = load_config().gate
    as_student = {"probes": {n: r.to_dict() for n, r in res.items()}}
    w = worst_case({"teacher": as_student, "student": as_student})  # a student that kept the backdoor
    assert w["student_asr"] == res["linear"].asr and w["asr_probe"] == "linear"
    verdict = judge(w["teacher_ca"], w["student_ca"], w["student_asr"], gate, asr_probe=w["asr_probe"])
    assert not verdict.passed and "(linear probe)" in verdict.reason
