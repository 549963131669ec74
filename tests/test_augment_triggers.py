from __future__ import annotations

import numpy as np
import pytest
import torch

from mimic.augment import adjust_hue, simclr_augment
from mimic.errors import ConfigError, DataError
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


def test_default_trigger_is_the_white_patch_exactly():
    from mimic.config import load_config
    from mimic.triggers import make_trigger

    a = load_config().attack
    t = make_trigger(a.trigger_size, a.trigger_margin, a.trigger_position, a.trigger_pattern, a.trigger_colour, a.trigger_alpha)
    w = white_patch(10, 1, 32)
    assert torch.equal(t.patch, w.patch) and torch.equal(t.mask, w.mask) and t.placement == "fixed"


def test_trigger_positions_sizes_and_patterns():
    from mimic.triggers import make_trigger

    x = torch.zeros(1, 3, 32, 32)
    tl = make_trigger(3, 2, "top_left", "colour", "red")
    s = tl.stamp(x)
    assert s[0, 0, 2:5, 2:5].eq(1).all() and s[0, 1:].eq(0).all() and s.sum() == 9
    assert make_trigger(4, 1, "bottom_left").mask[0, 27:31, 1:5].eq(1).all()
    assert make_trigger(4, 1, "top_right").mask[0, 1:5, 27:31].eq(1).all()
    c = make_trigger(6, 0, "centre")
    assert c.mask[0, 13:19, 13:19].eq(1).all() and c.area == 36 / 1024
    noise = make_trigger(5, 1, "bottom_right", "noise", seed=3)
    assert torch.equal(noise.patch, make_trigger(5, 1, "bottom_right", "noise", seed=3).patch)
    assert not torch.equal(noise.patch, make_trigger(5, 1, "bottom_right", "noise", seed=4).patch)
    assert noise.patch[:, 26:31, 26:31].std() > 0.1


def test_blended_full_image_trigger_is_soft_everywhere(tmp_path):
    from mimic.triggers import make_trigger

    t = make_trigger(position="full", pattern="noise", alpha=0.2, seed=1)
    x = torch.full((2, 3, 32, 32), 0.5)
    s = t.stamp(x)
    assert torch.allclose(s, 0.8 * x + 0.2 * t.patch) and t.area == pytest.approx(0.2) and not t.binary
    t.save_npz(tmp_path / "b.npz")
    with np.load(tmp_path / "b.npz") as z:
        assert z["tm"].dtype == np.float32
    back = Trigger.load_npz(tmp_path / "b.npz")
    assert torch.allclose(back.mask, t.mask) and (back.patch - t.patch).abs().max() <= 0.5 / 255 + 1e-6


def test_random_placement_moves_the_patch_per_image_and_round_trips(tmp_path):
    from mimic.triggers import make_trigger

    t = make_trigger(5, 0, "random", "white")
    x = torch.zeros(64, 3, 32, 32)
    s = t.stamp(x, torch.Generator().manual_seed(0))
    assert torch.all(s.sum(dim=(1, 2, 3)) == 3 * 25)  # the whole patch, always inside the image
    tops = [int(torch.nonzero(img[0].sum(1)).min()) for img in s]
    assert len(set(tops)) > 5
    assert torch.equal(t.stamp(x), t.stamp(x))  # without a generator: the same places every call
    t.save_npz(tmp_path / "r.npz")
    back = Trigger.load_npz(tmp_path / "r.npz")
    assert back.placement == "random" and torch.equal(back.stamp(x), t.stamp(x))
    assert Trigger.from_extras(t.to_extras()).placement == "random"


def test_soft_masks_load_soft_and_badencoder_masks_stay_binary(tmp_path):
    t = np.zeros((1, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "bin255.npz", t=t, tm=np.full((1, 32, 32, 3), 255, np.uint8))  # 0/255 uint8: binary
    assert Trigger.load_npz(tmp_path / "bin255.npz").mask.eq(1).all()
    np.savez(tmp_path / "soft.npz", t=t, tm=np.full((1, 32, 32, 3), 0.25, np.float32))
    assert torch.allclose(Trigger.load_npz(tmp_path / "soft.npz").mask, torch.full((1, 32, 32), 0.25))
    np.savez(tmp_path / "soft255.npz", t=t, tm=np.full((1, 32, 32, 3), 51.0, np.float64))
    assert torch.allclose(Trigger.load_npz(tmp_path / "soft255.npz").mask, torch.full((1, 32, 32), 0.2))
    np.savez(tmp_path / "odd.npz", t=t, tm=np.zeros((1, 32, 32, 3)), placement=np.array("sideways"))
    with pytest.raises(DataError, match="placement"):
        Trigger.load_npz(tmp_path / "odd.npz")


def test_bad_trigger_params_are_config_errors():
    from mimic.config import load_config

    for bad in ("attack.trigger_position=middle", "attack.trigger_pattern=plaid", "attack.trigger_colour=mauve",
                "attack.trigger_alpha=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(sets=[bad])
