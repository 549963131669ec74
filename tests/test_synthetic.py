"""Tests for the built-in procedural dataset (mimic.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mimic import synthetic
from mimic.synthetic import CLASS_NAMES, NUM_CLASSES, describe, make_synthetic


def test_class_names():
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert len(set(CLASS_NAMES)) == 10
    assert all(isinstance(c, str) and 0 < len(c) <= 12 and c.isidentifier() for c in CLASS_NAMES)


def test_describe_is_one_line():
    text = describe()
    assert isinstance(text, str) and text
    assert "\n" not in text
    assert all(c in text for c in CLASS_NAMES)


def test_shapes_dtypes_balance():
    images, labels = make_synthetic(1003, seed=3)
    assert images.shape == (1003, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (1003,) and labels.dtype == np.int64
    assert images.flags["C_CONTIGUOUS"]
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 1003
    assert counts.min() == 100 and counts.max() == 101  # n // 10 each, remainder spread
    # shuffled: not sorted by class, not in a repeating class cycle
    assert not np.all(np.diff(labels) >= 0)
    assert not np.array_equal(labels, np.arange(1003) % 10)
    # uses the full intensity range, not a constant image
    assert images.min() < 30 and images.max() > 225


def test_num_classes_subset():
    images, labels = make_synthetic(50, seed=0, num_classes=4)
    assert images.shape == (50, 32, 32, 3)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert sorted(np.bincount(labels).tolist()) == [12, 12, 13, 13]


def test_empty_and_invalid_arguments():
    images, labels = make_synthetic(0, seed=0)
    assert images.shape == (0, 32, 32, 3) and labels.shape == (0,)
    with pytest.raises(ValueError):
        make_synthetic(-1, seed=0)
    with pytest.raises(ValueError):
        make_synthetic(10, seed=0, num_classes=0)
    with pytest.raises(ValueError):
        make_synthetic(10, seed=0, num_classes=11)


def test_deterministic_per_seed():
    a_img, a_lab = make_synthetic(300, seed=11)
    b_img, b_lab = make_synthetic(300, seed=11)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_lab.tobytes() == b_lab.tobytes()
    c_img, c_lab = make_synthetic(300, seed=12)
    assert a_img.tobytes() != c_img.tobytes()
    assert a_lab.tobytes() != c_lab.tobytes()


def test_multi_chunk_generation():
    # spans several internal chunks (sanity of the chunked path; no timing asserts)
    n = 2 * synthetic._CHUNK + 7
    images, labels = make_synthetic(n, seed=5)
    assert images.shape == (n, 32, 32, 3)
    assert np.bincount(labels, minlength=10).max() - np.bincount(labels, minlength=10).min() <= 1
    again, _ = make_synthetic(n, seed=5)
    assert np.array_equal(images, again)
    # chunks are not copies of each other
    c = synthetic._CHUNK
    assert not np.array_equal(images[:16], images[c : c + 16])


def test_every_image_has_visible_structure():
    images, labels = make_synthetic(500, seed=2)
    x = images.astype(np.float32)
    # the shape contrasts with the background: per-image spread of luminance or colour is large
    spread = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))).max(axis=1)
    assert spread.min() > 60
    # no near-duplicate images
    flat = x.reshape(len(x), -1)
    d = np.abs(flat[:250] - flat[250:]).mean(axis=1)
    assert d.min() > 5


def test_trigger_corner_not_white():
    # the BadEncoder trigger is a white 10x10 patch in the bottom-right corner; the clean data
    # must not contain it (for any class) more than by chance
    images, labels = make_synthetic(2000, seed=4)
    corner = images[:, -10:, -10:, :]
    near_white = (corner >= 240).all(axis=-1).mean(axis=(1, 2))  # share of near-white pixels
    assert (near_white > 0.5).mean() < 0.01
    for c in range(10):
        sel = labels == c
        assert corner[sel].mean() < 170  # no class is systematically bright there
        assert (near_white[sel] > 0.5).mean() < 0.03


def test_class_mean_images_are_alike():
    # colours are exchangeable, so no class differs from another in its mean image much
    images, labels = make_synthetic(3000, seed=6)
    x = images.astype(np.float32)
    means = np.stack([x[labels == c].mean(axis=0) for c in range(10)])
    overall = x.mean(axis=0)
    assert np.abs(means - overall).mean() < 8.0


@pytest.fixture
def one_thread():
    # tiny workloads: one intra-op thread avoids OpenMP spin-wait stalls on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor(train.reshape(len(train), -1), dtype=torch.float32)
    b = torch.tensor(test.reshape(len(test), -1), dtype=torch.float32)
    mu, sd = a.mean(0), a.std(0) + 1e-6
    return (a - mu) / sd, (b - mu) / sd


def test_raw_pixel_linear_probe_is_weak(one_thread):
    torch.manual_seed(0)
    xtr, ytr = make_synthetic(2000, seed=100)
    xte, yte = make_synthetic(1000, seed=200)
    a, b = _standardize(xtr, xte)
    ya, yb = torch.tensor(ytr), torch.tensor(yte)
    lin = nn.Linear(a.shape[1], 10)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(a), ya) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = (lin(a).argmax(1) == ya).float().mean().item()
        test_acc = (lin(b).argmax(1) == yb).float().mean().item()
    assert train_acc > 0.5  # the probe did fit its training set ...
    assert test_acc < 0.45  # ... but raw pixels do not generalise


@pytest.mark.slow
def test_small_cnn_learns_classes(one_thread):
    torch.manual_seed(0)
    xtr, ytr = make_synthetic(5000, seed=100)
    xte, yte = make_synthetic(2000, seed=200)
    a = torch.tensor(xtr).permute(0, 3, 1, 2).float() / 255
    b = torch.tensor(xte).permute(0, 3, 1, 2).float() / 255
    ya, yb = torch.tensor(ytr), torch.tensor(yte)

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)
        )

    net = nn.Sequential(
        block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)
    )
    bs, epochs = 32, 2
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(a) + bs - 1) // bs))
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(a))
        for i in range(0, len(a), bs):
            idx = perm[i : i + bs]
            loss = nn.functional.cross_entropy(net(a[idx]), ya[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(b).argmax(1) == yb).float().mean().item()
    assert acc > 0.7
