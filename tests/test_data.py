from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_npz
from mimic.data import batches, load_dataset, stratified_indices
from mimic.errors import DataError


def test_npz_layout_loads(tmp_path):
    ds = load_dataset(str(write_npz(tmp_path / "d.npz")))
    assert ds.train.x.shape == (200, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.test is not None and len(ds.test) == 100 and ds.num_classes == 4
    assert ds.version == load_dataset(str(tmp_path / "d.npz")).version


@pytest.mark.parametrize(
    "arrays, msg",
    [
        ({"images": np.zeros((4, 32, 32, 3), np.uint8)}, "NPZ layout not recognised"),
        ({"x_train": np.zeros((4, 32, 32), np.uint8), "y_train": np.zeros(4, np.int64)}, r"\[N, H, W, 3\]"),
        ({"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.array([0, 1, -1, 2])}, "negative label"),
        ({"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.zeros(3, np.int64)}, "3 labels for 4 images"),
        ({"x_train": np.zeros((0, 32, 32, 3), np.uint8), "y_train": np.zeros(0, np.int64)}, "empty"),
        (
            {"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.array([0, 1, 1, 0]),
             "x_test": np.zeros((2, 32, 32, 3), np.uint8), "y_test": np.array([0, 7])},
            "out of range",
        ),
    ],
)
def test_bad_npz_is_refused(tmp_path, arrays, msg):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=msg):
        load_dataset(str(p))


def test_npz_with_object_array_is_refused_without_unpickling(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x_train=np.array([object()], dtype=object), y_train=np.zeros(1))
    with pytest.raises(DataError, match="refused"):
        load_dataset(str(p))


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported dataset"):
        load_dataset(str(tmp_path / "f.txt"))


def test_image_folder_skips_and_counts_corrupt_images(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    ds = load_dataset(str(tmp_path))
    assert len(ds.train) == 6 and ds.skipped == 1
    assert ds.class_names == ("cat", "dog") and ds.train.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_unlabelled_folder_and_empty_folder(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), i, np.uint8)).save(tmp_path / f"{i}.jpg")
    ds = load_dataset(str(tmp_path))
    assert len(ds.train) == 4 and ds.train.y is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_dataset(str(empty))


def test_stratified_subset_is_seeded_balanced_and_not_the_first_n():
    labels = torch.arange(1000) % 10
    idx = stratified_indices(1000, labels, 100, seed=0)
    assert len(idx) == len(set(idx.tolist())) == 100
    assert torch.bincount(labels[idx]).tolist() == [10] * 10
    assert idx.tolist() != list(range(100))
    assert torch.equal(idx, stratified_indices(1000, labels, 100, seed=0))
    assert not torch.equal(idx, stratified_indices(1000, labels, 100, seed=1))


def test_stratified_subset_keeps_proportions_of_unbalanced_classes():
    labels = torch.tensor([0] * 700 + [1] * 200 + [2] * 100)
    counts = torch.bincount(labels[stratified_indices(1000, labels, 50, seed=3)]).tolist()
    assert counts == [35, 10, 5]
    with pytest.raises(DataError):
        stratified_indices(10, None, 11, seed=0)


def test_batches_cover_everything_once():
    g = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batches(10, 3, g)))
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b) for b in batches(10, 3, g, drop_last=True)] == [3, 3, 3]


def test_synthetic_source_is_deterministic():
    a = load_dataset("synthetic", synthetic_train=40, synthetic_test=20, seed=5)
    b = load_dataset("synthetic", synthetic_train=40, synthetic_test=20, seed=5)
    assert a.version == b.version and a.num_classes == 10 and len(a.test) == 20
