"""Bad data: clear one-line errors from the library and the CLI, and nothing under the final output names.

Policy (``mimic/data.py``): unreadable images in a folder are **skipped and counted** (a warning,
``Dataset.skipped`` and ``data.skipped`` in the results JSON); everything else that is wrong is
refused with a :class:`DataError` before any output is written.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_npz
from mimic.cli import main
from mimic.config import load_config
from mimic.data import ImageSet, load_dataset
from mimic.errors import DataError

OUTPUTS = ("student.pt", "mi.json", "mi.png", "losses.json", "losses.png")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(random_teacher) -> Path:
    return random_teacher


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def image_folder(root: Path, per_class: dict[str, int], size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def distill_refused(capsys, teacher: Path, data: Path | str, out: Path, *words: str, sets: tuple[str, ...] = ()) -> str:
    """``mimic distill`` exits 2 with one ``mimic: error:`` line and writes none of its outputs."""
    args = ["distill", "--teacher", str(teacher), "--data", str(data), "--profile", "tiny", "--out", str(out),
            "--json", str(out) + ".json", "--quiet", "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mimic: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    for name in OUTPUTS:
        assert not (out / name).exists(), name
    assert not Path(str(out) + ".json").exists()
    return lines[0]


# ---------------------------------------------------------------- empty and too small


def test_empty_npz(tmp_path, capsys, teacher):
    path = npz(tmp_path / "empty.npz", x_train=images(0), y_train=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="the dataset is empty"):
        load_dataset(str(path))
    distill_refused(capsys, teacher, path, tmp_path / "out", "empty.npz", "the dataset is empty")
    assert not (tmp_path / "out").exists()


def test_empty_and_unreadable_folders(tmp_path, capsys, teacher):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_dataset(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(DataError, match=r"no readable images \(3 unreadable\)"):
        load_dataset(str(broken))
    distill_refused(capsys, teacher, broken, tmp_path / "out", "no readable images (3 unreadable)")
    assert not (tmp_path / "out").exists()


def test_fewer_images_than_one_batch(tmp_path, capsys, teacher):
    """20 images, batch 32: refused before the MI stage writes mi.json (library and CLI)."""
    from mimic.checkpoints import load_encoder
    from mimic.stages.distill import plan_distill

    path = npz(tmp_path / "small.npz", x_train=images(20), y_train=np.arange(20) % 4)
    out = tmp_path / "out"
    distill_refused(capsys, teacher, path, out, "clean set: 20 images, fewer than one batch (32)")
    assert not out.exists()
    cfg = load_config(profile="tiny")
    ds = load_dataset(str(path))
    with pytest.raises(DataError, match="fewer than one batch"):
        plan_distill(cfg, load_encoder(teacher), "fp", ds.train, ds.version, [1.0] * 4, progress=False)


def test_distill_library_refuses_fewer_than_two_images(teacher):
    import dataclasses

    from mimic.checkpoints import load_encoder
    from mimic.distill import distill

    cfg = dataclasses.replace(load_config(profile="tiny").distill, batch_size=1)
    one = ImageSet(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match="clean set: 1 images, need at least 2"):
        distill(load_encoder(teacher).encoder, one, cfg, [1.0] * 4, seed=0, work_dir=Path("/nonexistent/never"),
                key="k", device=torch.device("cpu"), progress=False)


# ---------------------------------------------------------------- corrupt images among good ones


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys, caplog, teacher):
    root = image_folder(tmp_path / "clean", {"a": 20, "b": 20})
    (root / "a" / "truncated.png").write_bytes((root / "a" / "0.png").read_bytes()[:60])
    (root / "b" / "notes.jpg").write_text("not an image")
    ds = load_dataset(str(root))
    assert len(ds.train) == 40 and ds.skipped == 2 and ds.train.y.tolist() == [0] * 20 + [1] * 20

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mimic"):
        rc = main(["distill", "--teacher", str(teacher), "--data", str(root), "--profile", "tiny", "--set", "distill.epochs=1",
                   "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert any("skipped 2 unreadable image(s)" in r.getMessage() for r in caplog.records)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["data"]["skipped"] == 2 and res["data"]["clean_images"] == 40
    assert (out / "student.pt").exists()


def test_images_of_different_sizes_are_refused(tmp_path):
    root = image_folder(tmp_path / "mixed", {"a": 3})
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(root / "a" / "small.png")
    with pytest.raises(DataError, match="images differ in size"):
        load_dataset(str(root))
    split = tmp_path / "split"
    image_folder(split / "train", {"a": 3, "b": 3})
    image_folder(split / "test", {"a": 2, "b": 2}, size=28)
    with pytest.raises(DataError, match=r"train and test images differ in shape \(\[3, 32, 32\] vs \[3, 28, 28\]\)"):
        load_dataset(str(split))


# ---------------------------------------------------------------- wrong NPZ layout


@pytest.mark.parametrize(
    "arrays,word",
    [
        ({"images": images(40), "labels": np.zeros(40, np.int64)}, "NPZ layout not recognised: need x_train"),
        ({"x_train": images(40).transpose(0, 3, 1, 2)}, "expected images shaped [N, H, W, 3], got [40, 3, 32, 32]"),
        ({"x_train": images(40)[..., 0]}, "expected images shaped [N, H, W, 3]"),
        ({"x_train": images(40).astype(np.float32) * 2}, "pixel values must be uint8 or within [0, 255]"),
        ({"x_train": images(40), "y_train": np.zeros(39, np.int64)}, "39 labels for 40 images"),
        ({"x_train": images(40), "y_train": np.full(40, 0.5)}, "labels must be integers"),
        ({"x_train": images(40), "y_train": np.array(["cat"] * 40)}, "labels must be integers"),
        ({"x_train": images(40), "x_test": images(8)}, "x_test and y_test must come together"),
        ({"x_train": images(40), "x_test": images(8, size=28), "y_test": np.zeros(8, np.int64)}, "differ in shape"),
    ],
    ids=["keys", "channels-first", "grey-3d", "float-range", "label-count", "float-labels", "string-labels",
         "test-without-labels", "test-shape"],
)
def test_wrong_npz_layout(tmp_path, capsys, teacher, arrays, word):
    path = npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    assert word in str(info.value) and "\n" not in str(info.value)
    distill_refused(capsys, teacher, path, tmp_path / "out", "bad.npz", word)


def test_npz_that_is_not_a_zip_and_object_arrays(tmp_path, capsys, teacher):
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    distill_refused(capsys, teacher, tmp_path / "text.npz", tmp_path / "o1", "not a readable NPZ file")
    obj = npz(tmp_path / "obj.npz", x_train=np.array([object()] * 40, dtype=object))
    distill_refused(capsys, teacher, obj, tmp_path / "o2", "refused", "allow_pickle")


def test_wrong_layout_through_the_real_command(tmp_path, teacher):
    """A separate process: exit status 2, one stderr line, no traceback, no outputs."""
    path = npz(tmp_path / "chw.npz", x_train=images(40).transpose(0, 3, 1, 2))
    exe = Path(sys.executable).with_name("mimic")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mimic.cli"]
    out = tmp_path / "out"
    r = subprocess.run([*cmd, "distill", "--teacher", str(teacher), "--data", str(path), "--profile", "tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mimic: error: ") and "[N, H, W, 3]" in r.stderr, r.stderr
    assert not out.exists()


# ---------------------------------------------------------------- labels out of range


@pytest.mark.parametrize(
    "y_train,y_test,words",
    [
        (np.arange(40) % 10 + 1, None, ("label 10 out of range for the 10 classes present", "no image has class 0 (1-based labels?)")),
        (np.r_[np.arange(39) % 10, 10], np.arange(8) % 10, None),  # a stray 11th class is fine on its own ...
        (np.arange(40) % 10, np.r_[np.arange(7) % 10, 10], ("test label 10 out of range for 10 classes",)),
        (np.r_[np.arange(39) % 10, -1], None, ("negative label -1",)),
        (np.arange(40) % 10, np.r_[np.arange(7) % 10, -3], ("negative label -3",)),
        (np.r_[np.arange(39) % 10, 10**9], None, ("label 1000000000 out of range for the 11 classes present", "class 10, 11, 12, 13, 14 (and 999999985 more)")),
        (np.where(np.arange(40) % 10 == 3, 4, np.arange(40) % 10), None, ("label 9 out of range for the 9 classes present", "no image has class 3;")),
    ],
    ids=["one-based", "stray-class-ok", "test-beyond-train", "negative-train", "negative-test", "huge", "gap"],
)
def test_labels_out_of_range(tmp_path, capsys, teacher, y_train, y_test, words):
    arrays = {"x_train": images(40), "y_train": y_train}
    if y_test is not None:
        arrays |= {"x_test": images(8, seed=1), "y_test": y_test}
    path = npz(tmp_path / "labels.npz", **arrays)
    if words is None:
        assert load_dataset(str(path)).num_classes == 11
        return
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    msg = str(info.value)
    assert all(w in msg for w in words) and "\n" not in msg, msg
    distill_refused(capsys, teacher, path, tmp_path / "out", *words)


def test_target_class_out_of_range_through_cli(tmp_path, capsys, teacher):
    """... but a target class the data does not have is refused where it is used."""
    from mimic.triggers import white_patch

    data = write_npz(tmp_path / "d.npz", n_train=40, n_test=20, classes=10)
    white_patch().save_npz(tmp_path / "trigger.npz")
    for args, word in (
        (["evaluate", "--encoder", str(teacher), "--trigger", str(tmp_path / "trigger.npz"), "--target-class", "10"],
         "target class 10 out of range for 10 classes"),
        (["evaluate", "--encoder", str(teacher), "--trigger", str(tmp_path / "trigger.npz"), "--target-class", "-1"],
         "target class -1 out of range for 10 classes"),
        (["attack", "badencoder", "--clean", str(teacher), "--out", str(tmp_path / "bad.pt"), "--set", "attack.target_class=10"],
         "attack.target_class 10 out of range for 10 classes"),
    ):
        capsys.readouterr()
        rc = main([*args, "--data", str(data), "--profile", "tiny", "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("mimic: error: ") and word in err, (args, err)
    assert not (tmp_path / "bad.pt").exists()


def test_folder_labels(tmp_path):
    root = image_folder(tmp_path / "d", {"cat": 3, "dog": 3})
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class: class folder has no readable images"):
        load_dataset(str(root))
    split = tmp_path / "split"
    image_folder(split / "train", {"cat": 3, "dog": 3, "eel": 3})
    image_folder(split / "test", {"cat": 2, "eel": 2})  # dog missing: labels map by name, not position
    ds = load_dataset(str(split))
    assert ds.test.y.tolist() == [0, 0, 2, 2] and ds.num_classes == 3
    image_folder(split / "test", {"fox": 1})
    with pytest.raises(DataError, match="class folder\\(s\\) fox not among the training classes"):
        load_dataset(str(split))
