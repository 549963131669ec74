"""MI estimators: closed-form golden test on Gaussians, weights, and caching of stage features."""

from __future__ import annotations

import math

import pytest
import torch

from mimic.encoders import count_hooks
from mimic.mi import analyse, dv_bound, estimate_mi, extract_stage_features, mi_weights, uniform_weights


def correlated_gaussians(n: int, d: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y, -0.5 * d * math.log(1 - rho**2)


def test_dv_estimator_within_15_percent_of_closed_form():
    x, y, true_mi = correlated_gaussians(8000, 2, 0.8, seed=0)  # I = -log(1 - .64) = 1.0217 nats
    est = estimate_mi([x], y, estimator="dv", epochs=40, batch_size=500, lr=2e-3, hidden=128, seed=0)[0]
    assert abs(est - true_mi) / true_mi < 0.15, (est, true_mi)


def test_dv_estimator_near_zero_for_independent_variables():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4000, 2, generator=g), torch.randn(4000, 2, generator=g)
    est = estimate_mi([x], y, estimator="dv", epochs=20, batch_size=500, hidden=64, seed=0)[0]
    assert est < 0.1


def test_infonce_orders_dependence():
    x, y, _ = correlated_gaussians(4000, 2, 0.9, seed=2)
    _, y_weak, _ = correlated_gaussians(4000, 2, 0.3, seed=2)
    strong, weak = estimate_mi([x, x], y, estimator="infonce", epochs=15, batch_size=256, hidden=64, seed=0)
    assert strong > 0.5
    weak_est = estimate_mi([x], y_weak, estimator="infonce", epochs=15, batch_size=256, hidden=64, seed=0)[0]
    assert weak_est < strong


def test_dv_bound_closed_form():
    # T = 0 everywhere -> bound 0; T constant c on joint, 0 on marginal -> c
    assert float(dv_bound(torch.zeros(10), torch.zeros(10))) == 0.0
    assert math.isclose(float(dv_bound(torch.full((10,), 2.0), torch.zeros(10))), 2.0, rel_tol=1e-6)


def test_mi_weights_formula_and_fallback():
    w = mi_weights([1.0, 3.0, 0.0, float("nan")], base=1000, scale=10000)
    assert w == [1000 + 2500, 1000 + 7500, 1000, 1000]
    assert mi_weights([-0.2, 0.0, float("nan"), 0.0]) == uniform_weights(4) == [3500.0] * 4
    assert all(math.isfinite(v) for v in mi_weights([0.0, 0.0]))


def test_softmax_mapping_is_sharper_with_the_same_total():
    mi = [4.01, 3.82, 4.14, 4.65]  # the CIFAR-10 teacher's estimates (docs/cifar10.md)
    share = mi_weights(mi)
    sharp = mi_weights(mi, mapping="softmax", temperature=0.25)
    assert sum(sharp) == pytest.approx(sum(share)) == pytest.approx(4 * 1000 + 10000)
    assert max(share) / min(share) < 1.2 < 5 < max(sharp) / min(sharp)
    assert sharp.index(max(sharp)) == 3 and min(sharp) >= 1000  # the top-MI stage dominates; none is dropped
    assert mi_weights(mi, mapping="softmax", temperature=1e6) == pytest.approx(uniform_weights(4))
    assert mi_weights([0.0, 0.0], mapping="softmax") == uniform_weights(2)
    with pytest.raises(ValueError, match="unknown MI mapping"):
        mi_weights(mi, mapping="cubic")


def test_mapping_is_a_validated_mi_param():
    from mimic.config import load_config
    from mimic.errors import ConfigError

    assert load_config().mi.mapping == "share"  # the paper's stays the default (scenarios/zoo's matrix decides: its "sharp" cells, docs/results.md)
    with pytest.raises(ConfigError, match="mi.mapping"):
        load_config(sets=["mi.mapping=cubic"])
    with pytest.raises(ConfigError, match="mi.temperature"):
        load_config(sets=["mi.temperature=0"])


def test_stage_features_one_pass_and_hooks_removed(tiny_encoder, tiny_images):
    calls = {"n": 0}
    handle = tiny_encoder.backbone.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    feats = extract_stage_features(tiny_encoder, tiny_images, pool=2, batch_size=32)
    handle.remove()
    assert calls["n"] == 2  # 64 images, batch 32: the network ran over the data exactly once
    assert feats.stages == ("layer1", "layer2", "layer3", "layer4")
    assert [h.shape for h in feats.h] == [(64, 4 * 4), (64, 8 * 4), (64, 16 * 4), (64, 32 * 4)]
    assert torch.allclose(feats.z.norm(dim=1), torch.ones(64), atol=1e-5)
    assert count_hooks(tiny_encoder) == 0


def test_analyse_returns_weights_for_every_stage(tiny_encoder, tiny_images):
    res = analyse(tiny_encoder, tiny_images, epochs=2, batch_size=32, hidden=32)
    assert len(res.mi) == len(res.weights) == 4
    assert all(v >= 0 for v in res.mi)
    assert all(w >= 1000 for w in res.weights)
    assert count_hooks(tiny_encoder) == 0
