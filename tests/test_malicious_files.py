"""Crafted model files are refused with a one-line CheckpointError, and nothing in them runs.

Every payload, if it were executed, would create a marker file; each test asserts the marker is
absent afterwards. ``test_payloads_are_live`` proves the payloads really do work when unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from mimic.checkpoints import load_encoder, load_state, read_raw
from mimic.errors import CheckpointError

EVIL_MODULE = "mimic_test_evil_module"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not thrash a shared CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def global_pickle(module: str, name: str, proto: int) -> bytes:
    """A pickle that only imports ``module.name`` (GLOBAL for proto < 4, STACK_GLOBAL otherwise)."""
    if proto < 4:
        return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
    mod, nm = module.encode(), name.encode()
    return (
        b"\x80\x04\x8c" + bytes([len(mod)]) + mod + b"\x94\x8c" + bytes([len(nm)]) + nm + b"\x94\x93\x94."
    )


def reduce_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol-4 pickle calling ``module.name(arg)``; ``name`` may be dotted (attribute walk)."""

    def text(v: str) -> bytes:
        return b"\x8c" + bytes([len(v.encode())]) + v.encode() + b"\x94"

    return b"\x80\x04" + text(module) + text(name) + b"\x93\x94" + text(arg) + b"\x85R."


def py2_eval_pickle(code: str) -> bytes:
    """Protocol-2 pickle calling ``__builtin__.eval(code)`` (Python 2 name, mapped by pickle)."""
    raw = code.encode()
    return b"\x80\x02c__builtin__\neval\nX" + struct.pack("<I", len(raw)) + raw + b"\x85R."


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def evil_module(tmp_path, monkeypatch, marker) -> str:
    """A module that writes the marker when imported."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\nthing = 1\n"
    )
    monkeypatch.syspath_prepend(str(mod_dir))
    sys.modules.pop(EVIL_MODULE, None)
    yield EVIL_MODULE
    sys.modules.pop(EVIL_MODULE, None)


def refused(path: Path, marker: Path, *words: str) -> str:
    """Assert every loader refuses ``path`` with a one-line message and no marker appears."""
    messages = []
    for loader in (read_raw, load_encoder, load_state):
        with pytest.raises(CheckpointError) as info:
            loader(path)
        messages.append(str(info.value))
    for msg in messages:
        assert "\n" not in msg and "\r" not in msg, msg
        assert msg.startswith(f"{path}: "), msg
        for word in words:
            assert word in msg, msg
    assert not marker.exists(), "payload executed!"
    assert EVIL_MODULE not in sys.modules
    return messages[0]


def test_payloads_are_live(tmp_path, evil_module, marker):
    """Control: the payloads used below really execute when unpickled the unsafe way."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    pickle.loads(global_pickle(evil_module, "thing", 4))
    assert marker.exists()
    marker.unlink()
    sys.modules.pop(evil_module, None)
    pickle.loads(reduce_pickle("torch.serialization", "os.system", f"touch '{marker}'"))
    assert marker.exists()
    marker.unlink()
    pickle.loads(py2_eval_pickle(f"open({str(marker)!r}, 'w')"))
    assert marker.exists()


@pytest.mark.parametrize("proto", [0, 2, 5])
def test_plain_pickle_reduce_os_system(tmp_path, marker, proto):
    path = tmp_path / "teacher.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=proto))
    msg = refused(path, marker, "refused", "pickled code", "system")
    assert os.system.__module__ + ".system" in msg  # e.g. posix.system


def test_torch_zip_with_reduce(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "x": Payload(marker)}, path)
    refused(path, marker, "refused", "pickled code", "system")


def _rewrite_data_pkl(src: Path, dst: Path, new_pkl: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = new_pkl if info.filename.endswith("/data.pkl") else zin.read(info.filename)
            zout.writestr(info.filename, data)


def test_torch_zip_with_rewritten_data_pkl(tmp_path, marker, evil_module):
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.zeros(3)}, benign)
    path = tmp_path / "teacher.pt"
    _rewrite_data_pkl(benign, path, pickle.dumps(Payload(marker), protocol=2))
    refused(path, marker, "refused", "system")
    path2 = tmp_path / "teacher2.pt"
    _rewrite_data_pkl(benign, path2, global_pickle(evil_module, "thing", 4))
    refused(path2, marker, "refused", f"{evil_module}.thing")


def test_torch_namespace_attribute_walk(tmp_path, marker):
    """``torch.serialization`` + ``os.system`` resolves to os.system under a plain unpickler."""
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.zeros(3)}, benign)
    path = tmp_path / "teacher.pt"
    _rewrite_data_pkl(benign, path, reduce_pickle("torch.serialization", "os.system", f"touch '{marker}'"))
    refused(path, marker, "refused", "torch.serialization.os.system")


def test_python2_builtin_eval(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.write_bytes(py2_eval_pickle(f"open({str(marker)!r}, 'w')"))
    refused(path, marker, "refused", "builtins.eval")


def test_legacy_torch_format_with_reduce(tmp_path, marker):
    path = tmp_path / "legacy.pt"
    with open(path, "wb") as fh:
        torch.save({"w": torch.zeros(3), "x": Payload(marker)}, fh, _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    refused(path, marker, "refused", "system")


def test_legacy_torch_format_benign_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_raw(path)["w"], torch.arange(3.0))


def test_legacy_tar_format(tmp_path, marker):
    path = tmp_path / "old.tar.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            ("sys_info", pickle.dumps({"protocol_version": 1001})),
            ("pickle", pickle.dumps(Payload(marker), protocol=2)),
            ("storages", pickle.dumps(0, protocol=2)),
            ("tensors", pickle.dumps(0, protocol=2)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    refused(path, marker, "refused", "legacy PyTorch tar format")


@pytest.mark.parametrize("name", ["weights.npy", "teacher.pt"])
def test_numpy_object_array(tmp_path, marker, name):
    path = tmp_path / name
    np.save(path, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    if name.endswith(".pt"):  # np.save appends .npy to other suffixes
        path = path.with_name(name + ".npy")
        path.rename(tmp_path / name)
        path = tmp_path / name
    refused(path, marker, "refused", "numpy object array")


@pytest.mark.parametrize("proto", [2, 4])
def test_pickle_importing_module_by_global(tmp_path, marker, evil_module, proto):
    path = tmp_path / "teacher.pt"
    path.write_bytes(global_pickle(evil_module, "thing", proto))
    refused(path, marker, "refused", f"{evil_module}.thing")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive(tmp_path, marker):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    refused(path, marker, "refused", "TorchScript")


# ---------------------------------------------------------------- safetensors with lying headers


def _st_file(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _valid_parts() -> tuple[dict, bytes]:
    blob = st_save({"a": torch.zeros(4), "b": torch.ones(4)})
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def test_safetensors_offsets_beyond_file(tmp_path, marker):
    header, data = _valid_parts()
    header["b"]["data_offsets"] = [16, 4096]
    header["b"]["shape"] = [1020]
    msg = refused(_st_file(tmp_path / "beyond.safetensors", header, data), marker, "refused", "beyond")
    assert "'b'" in msg


def test_safetensors_overlapping(tmp_path, marker):
    header, data = _valid_parts()
    header["b"]["data_offsets"] = [8, 24]
    refused(_st_file(tmp_path / "overlap.safetensors", header, data), marker, "refused", "overlap")


def test_safetensors_header_larger_than_file(tmp_path, marker):
    header, data = _valid_parts()
    path = _st_file(tmp_path / "big.safetensors", header, data, length=10_000_000)
    refused(path, marker, "refused", "larger than the file")


@pytest.mark.parametrize(
    "mutate,word",
    [
        (lambda h: h["a"].update(dtype="OBJ"), "unknown dtype"),
        (lambda h: h["a"].update(shape=[5]), "need"),
        (lambda h: h["a"].update(data_offsets=[0, -16]), "invalid data_offsets"),
        (lambda h: h.update(__metadata__={"x": 1}), "__metadata__"),
    ],
)
def test_safetensors_bad_entries(tmp_path, marker, mutate, word):
    header, data = _valid_parts()
    mutate(header)
    refused(_st_file(tmp_path / "bad.safetensors", header, data), marker, "refused", word)


def test_safetensors_truncated_and_bad_json(tmp_path, marker):
    good = st_save({"a": torch.zeros(64)})
    path = tmp_path / "trunc.safetensors"
    path.write_bytes(good[: len(good) - 100])
    refused(path, marker, "refused")
    bad = tmp_path / "json.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    refused(bad, marker, "not valid JSON")


# ---------------------------------------------------------------- broken or wrong files


def test_truncated_torch_zip(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    torch.save({"w": torch.randn(4096)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path, marker, "truncated")


def test_truncated_legacy(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    torch.save({"w": torch.randn(64)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:40])
    refused(path, marker, "truncated")


def test_zero_byte_file(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"")
    refused(path, marker, "empty file")


def test_directory(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.mkdir()
    refused(path, marker, "is a directory")


def test_missing_file(tmp_path, marker):
    refused(tmp_path / "nope.pt", marker, "no such file")


def test_text_file_named_pt(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.write_text("<html><body>404 Not Found</body></html>\n")
    refused(path, marker, "a text file")


def test_random_bytes(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)
    refused(path, marker, "unrecognised file format")


def test_plain_pickle_of_tensors_is_refused(tmp_path, marker):
    path = tmp_path / "teacher.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    refused(path, marker, "plain Python pickle")
