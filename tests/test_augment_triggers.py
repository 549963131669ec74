from __future__ import annotations

import numpy as np
import torch

from mimic.augment import adjust_hue, simclr_augment
from mimic.triggers import Trigger, white_patch


def test_augment_is_deterministic_in_range_and_varied():
    x = torch.rand(8, 3, 32, 32)
    a = simclr_augment(x, torch.Generator().manual_seed(0))
    b = simclr_augment(x, torch.Generator().manual_seed(0))
    c = simclr_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_hue_rotation_matches_known_colours():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    assert torch.allclose(adjust_hue(red, torch.tensor([0.0])), red, atol=1e-6)


def test_white_patch_bottom_right():
    t = white_patch(10, 1, 32)
    x = torch.zeros(2, 3, 32, 32)
    s = t.stamp(x)
    assert s[:, :, 21:31, 21:31].eq(1).all()
    assert s.sum() == 2 * 3 * 100


def test_trigger_npz_roundtrip_badencoder_layout(tmp_path):
    t = white_patch(10, 1, 32)
    t.save_npz(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        assert z["t"].shape == (1, 32, 32, 3) and z["tm"].shape == (1, 32, 32, 3)
    back = Trigger.load_npz(tmp_path / "t.npz")
    assert torch.equal(back.patch, t.patch) and torch.equal(back.mask, t.mask)
