"""Golden values for the MIMIC / SimCLR / BadEncoder losses, and reference equivalence."""

from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F

from mimic.losses import attention_loss, attention_map, badencoder_loss, clone_loss, nt_xent, weighted_attention


def reference_nt_xent(out_1: torch.Tensor, out_2: torch.Tensor, t: float) -> torch.Tensor:
    """The SimCLR / BadEncoder / MIMIC authors' formulation, written out literally."""
    out_1, out_2 = F.normalize(out_1, dim=1), F.normalize(out_2, dim=1)
    out = torch.cat([out_1, out_2], dim=0)
    n = out_1.shape[0]
    sim = torch.exp(out @ out.t() / t)
    mask = ~torch.eye(2 * n, dtype=torch.bool)
    sim = sim.masked_select(mask).view(2 * n, -1)
    pos = torch.exp((out_1 * out_2).sum(dim=-1) / t)
    pos = torch.cat([pos, pos], dim=0)
    return (-torch.log(pos / sim.sum(dim=-1))).mean()


def test_nt_xent_golden_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # every anchor: positive logit 1/0.5 = 2, two negatives at 0 -> log(1 + 2 e^-2)
    assert math.isclose(float(nt_xent(z, z.clone(), 0.5)), math.log(1 + 2 * math.exp(-2)), rel_tol=1e-6)


def test_nt_xent_matches_reference_implementation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert torch.allclose(nt_xent(a, b, t), reference_nt_xent(a, b, t), atol=1e-5)


def test_nt_xent_lower_for_aligned_views():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(32, 16, generator=g)
    assert nt_xent(a, a + 0.01 * torch.randn(32, 16, generator=g)) < nt_xent(a, torch.randn(32, 16, generator=g))


def test_nt_xent_logits_stay_float32_under_bf16_autocast():
    """Under CPU bf16 autocast the loss (and its gradient) is the float32 one, not a bf16-rounded one."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    z1.requires_grad_(True)
    want = nt_xent(z1, z2)
    (g_want,) = torch.autograd.grad(want, z1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent(z1, z2)
    (g_got,) = torch.autograd.grad(got, z1)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(g_got, g_want, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the bf16 matmul would have given: visibly off
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        rough = (z @ z.t()).float()
    assert (rough - z.detach() @ z.detach().t()).abs().max() > 1e-3


def test_attention_golden_value():
    fs = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    ft = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    # a(F_S) = e1, a(F_T) = e2 -> MSE over 4 positions = 2 / 4
    assert math.isclose(float(attention_loss(fs, ft)), 0.5, rel_tol=1e-6)
    assert float(attention_loss(fs, fs)) == 0.0


def test_attention_map_is_channel_power_sum_normalised():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 5, 3, 3, generator=g)
    expected = f.abs().pow(2).sum(dim=1).flatten(1)
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(attention_map(f, 2), expected, atol=1e-6)
    # p=1 uses |F|
    e1 = f.abs().sum(dim=1).flatten(1)
    assert torch.allclose(attention_map(f, 1), e1 / e1.norm(dim=1, keepdim=True), atol=1e-6)


def test_weighted_attention_sums_weighted_terms():
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    want = 10 * attention_loss(s[0], t[0]) + 3 * attention_loss(s[1], t[1])
    assert torch.allclose(weighted_attention(s, t, [10.0, 3.0]), want)


def test_clone_golden_values():
    assert math.isclose(float(clone_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]))), -1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(float(clone_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[5.0, 0.0]]))), -1.0, rel_tol=1e-6)
    assert abs(float(clone_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])))) < 1e-7


def test_badencoder_loss_golden_value():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    total, parts = badencoder_loss(e1, e1, e1, e1, e2, 1.0, 1.0)
    # effectiveness -1 (aligned), reference utility -1, clean utility 0
    assert math.isclose(float(total), -2.0, abs_tol=1e-6)
    assert parts == {"effectiveness": -1.0, "reference_utility": -1.0, "clean_utility": 0.0}


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    from mimic.losses import mean_pairwise_cosine

    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    u = torch.nn.functional.normalize(z, dim=1)
    brute = sum(float(u[i] @ u[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert float(mean_pairwise_cosine(z)) == pytest.approx(brute, abs=1e-6)
    assert float(mean_pairwise_cosine(torch.ones(4, 3))) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(z[:1])
