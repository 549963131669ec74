"""Crafted model files are refused with a one-line CheckpointError, and nothing in them runs.

Every payload, if it were executed, would create a marker file; each test asserts the marker is
absent afterwards. ``test_payloads_are_live`` proves the payloads really do work when unpickled.
Every refused file also goes through the command line (``mimic fingerprint FILE``): exit status 2,
exactly one line on stderr starting ``mimic: error:``, nothing on stdout, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from mimic.checkpoints import Limits, load_encoder, load_state, read_raw
from mimic.cli import main
from mimic.encoders import Encoder, EncoderSpec
from mimic.errors import CheckpointError

EVIL_MODULE = "mimic_test_evil_module"


pytestmark = pytest.mark.usefixtures("one_thread")


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


def cli_fingerprint(path: Path) -> tuple[int, str, str]:
    """``mimic fingerprint PATH`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["fingerprint", str(path), "--quiet"])
    return rc, out.getvalue(), err.getvalue()


def cli_refused(path: Path, *words: str) -> str:
    """Assert ``mimic fingerprint PATH`` exits 2 with one ``mimic: error:`` line naming the file."""
    rc, out, err = cli_fingerprint(path)
    assert rc == 2, (rc, out, err)
    assert out == "", out
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"mimic: error: {path}: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def refused(path: Path, marker: Path, *words: str) -> str:
    """Assert every loader and the CLI refuse ``path`` with a one-line message and no marker appears."""
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
    cli_refused(path, *words)
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


def test_legacy_torch_format_is_refused_even_when_benign(tmp_path, marker):
    """The pre-1.6 loader allocates every storage at its declared size: refused, with how to re-save."""
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=False)
    refused(path, marker, "refused", "legacy (pre-1.6, non-zip) format", "re-save")


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
    msg = refused(path, marker, "a text file")
    assert "<html>" not in msg and "404" not in msg  # messages never quote a file's content


def test_random_bytes(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)
    refused(path, marker, "unrecognised file format")


def test_plain_pickle_of_tensors_is_refused(tmp_path, marker):
    path = tmp_path / "teacher.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    refused(path, marker, "plain Python pickle")


def test_safetensors_duplicate_keys_gaps_and_trailing_bytes(tmp_path, marker):
    header, data = _valid_parts()
    raw = json.dumps(header).encode()
    dup = raw[:-1] + b', "a": ' + json.dumps(header["a"]).encode() + b"}"  # "a" twice: which one wins?
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(dup)) + dup + data)
    refused(path, marker, "refused", "duplicate keys a")
    gap = {"a": dict(header["a"], data_offsets=[16, 32])}
    refused(_st_file(tmp_path / "gap.safetensors", gap, data), marker, "refused", "gap before tensor 'a'")
    refused(_st_file(tmp_path / "tail.safetensors", header, data + b"\0" * 8), marker, "refused", "8 unaccounted bytes")


def test_gzip_compressed_checkpoint(tmp_path, marker):
    import gzip

    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    path = tmp_path / "teacher.pt.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    refused(path, marker, "gzip-compressed")


# ---------------------------------------------------------------- resource exhaustion


def test_zip_bomb_is_refused_before_inflating(tmp_path, marker):
    """A ~64 KiB checkpoint whose storage record inflates to 64 MiB is refused from the zip directory."""
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.zeros(4)}, benign)
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(benign) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("data/0"):
                bomb = zipfile.ZipInfo(info.filename)
                bomb.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(bomb, "w", force_zip64=True) as fh:
                    chunk = bytes(1 << 20)
                    for _ in range(64):
                        fh.write(chunk)
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    assert path.stat().st_size < (1 << 20)
    refused(path, marker, "refused", "zip bomb", "expand to 671")


def test_fifo_is_refused_without_blocking(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    os.mkfifo(path)  # reading it would block forever
    refused(path, marker, "not a regular file")


def test_oversized_file_is_refused_without_reading(tmp_path, marker):
    path = tmp_path / "teacher.pt"
    with open(path, "wb") as fh:  # sparse: 3 GiB apparent size, no disk used
        fh.truncate(3 << 30)
    refused(path, marker, "refused", "exceeds limit max_file_bytes=")


def test_oversized_safetensors_header_is_refused(tmp_path, marker):
    header, data = _valid_parts()
    header["__metadata__"] = {"pad": "x" * 100}
    path = _st_file(tmp_path / "big.safetensors", header, data)
    assert set(read_raw(path, limits=Limits(max_header_bytes=1000)).tensors) == {"a", "b"}
    for loader in (read_raw, load_encoder, load_state):
        with pytest.raises(CheckpointError, match="refused: safetensors header bytes .* exceeds limit max_header_bytes=64"):
            loader(path, limits=Limits(max_header_bytes=64))


# ---------------------------------------------------------------- well-formed files with wrong content


def _sd(width: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Encoder(EncoderSpec(width=width)).backbone.state_dict().items()}


def _save(path: Path, sd: dict) -> Path:
    torch.save(sd, path)
    return path


def test_wrong_architecture_through_cli(tmp_path):
    import torchvision

    path = _save(tmp_path / "r34.pt", torchvision.models.resnet34().state_dict())
    cli_refused(path, "unsupported architecture", "resnet34")
    vit = {"conv_proj.weight": torch.zeros(8, 3, 16, 16), "encoder.layers.0.ln.weight": torch.ones(8)}
    cli_refused(_save(tmp_path / "vit.pt", vit), "no conv1.weight", "conv_proj.weight")
    tv = _sd()
    tv["conv1.weight"] = torch.zeros(4, 3, 5, 5)
    cli_refused(_save(tmp_path / "k5.pt", tv), "unsupported architecture", "conv1 kernel 5x5")


def test_missing_key_through_cli(tmp_path):
    sd = _sd()
    del sd["layer4.1.bn2.weight"]
    cli_refused(_save(tmp_path / "m.pt", sd), "missing 1 key(s): layer4.1.bn2.weight")


def test_unexpected_key_through_cli(tmp_path):
    sd = _sd()
    sd["layer2.0.extra.weight"] = torch.zeros(3)
    cli_refused(_save(tmp_path / "u.pt", sd), "unexpected 1 key(s): layer2.0.extra.weight")


def test_shape_mismatch_through_cli(tmp_path):
    sd = _sd()
    sd["layer3.0.bn1.running_var"] = torch.ones(5)
    cli_refused(_save(tmp_path / "s.pt", sd), "shape mismatch for layer3.0.bn1.running_var", "[5]", "[16]")


@pytest.mark.parametrize("value,word", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"), (float("-inf"), "1 Inf")])
def test_non_finite_weights_through_cli(tmp_path, value, word):
    sd = _sd()
    sd["layer4.0.conv2.weight"].view(-1)[7] = value
    cli_refused(_save(tmp_path / "nan.pt", sd), "non-finite weights", "tensor layer4.0.conv2.weight", word)
    from safetensors.torch import save_file

    st = tmp_path / "nan.safetensors"
    save_file(sd, str(st))
    cli_refused(st, "non-finite weights", "tensor layer4.0.conv2.weight", word)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda t: t.to_sparse(), ("layout sparse_coo",)),
        (lambda t: torch.empty_like(t, device="meta"), ("meta tensor",)),
        (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), ("refused", "quantized tensors")),
        (lambda t: t.to(torch.int64), ("dtype mismatch", "int64")),
        (lambda t: t > 0, ("dtype mismatch", "bool")),
        (lambda t: t.to(torch.complex64), ("dtype mismatch", "complex64")),
    ],
    ids=["sparse", "meta", "quantized", "int", "bool", "complex"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_exotic_tensors_are_refused_not_converted(tmp_path, make, words):
    """Tensors torch would silently convert or choke on (a traceback) are named and refused.
    Quantized tensors are refused by the pickle scan, before torch's rebuild allocates their
    declared shape, so that message names the kind rather than the key."""
    sd = _sd()
    sd["layer1.1.conv1.weight"] = make(sd["layer1.1.conv1.weight"])
    key = () if "quantized tensors" in words else ("layer1.1.conv1.weight",)
    cli_refused(_save(tmp_path / "odd.pt", sd), *key, *words)


def test_malicious_pickle_through_the_real_command(tmp_path, marker):
    """The installed ``mimic`` executable: exit 2, one stderr line, no marker."""
    path = tmp_path / "teacher.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    exe = Path(sys.executable).with_name("mimic")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mimic.cli"]
    r = subprocess.run([*cmd, "fingerprint", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mimic: error: {path}: refused: the file contains pickled code"), r.stderr
    assert not marker.exists()
