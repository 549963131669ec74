"""Issue 12: hostile files are refused with one line naming the limit or the problem, before any
allocation proportional to what they declare; the defaults admit every real encoder we support.

One test per row of tests/hostile.py (size bombs, wrongly typed extras, deep JSON, memo bomb, case
aliasing, normalisation, ...), through ``load_encoder`` and the command line. The sizes the old
loader would have allocated are astronomically large, so a regression fails fast. The peak-RSS
bound (< 300 MB above baseline) is checked by the slow test at the end, which runs
benchmarks/bench_hostile.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hostile import CASES, HUGE_WIDTH, mimic_payload, save, w4_state, zip_with
from mimic.checkpoints import Limits, load_encoder, read_raw, save_encoder
from mimic.cli import main
from mimic.encoders import Encoder, EncoderSpec
from mimic.errors import CheckpointError, ConfigError
from mimic.fingerprint import fingerprint_file

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def refusal(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_encoder(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(f"{path}: "), msg
    assert "unexpected error" not in msg, msg  # the last-resort boundary must never be what answers
    return msg


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_is_refused_in_one_line(tmp_path, case):
    path = case.build(tmp_path)
    msg = refusal(path)
    assert case.expect in msg, msg
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["fingerprint", str(path), "--quiet"])
    assert rc == 2 and out.getvalue() == "", (rc, out.getvalue())
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith(f"mimic: error: {path}: "), err.getvalue()
    assert case.expect in err.getvalue()


def test_names_from_the_file_cannot_forge_lines(tmp_path):
    """Key and record names are escaped: a newline in a name stays one line of output."""
    sd = w4_state()
    sd["layer1.0.x\nmimic: ok: forged"] = torch.zeros(1)
    msg = refusal(save(tmp_path / "nl.pt", sd))
    assert "unexpected 1 key(s): layer1.0.x\\nmimic: ok: forged" in msg, msg
    path = zip_with(tmp_path / "nl_record.pt", add=[("archive/x\ny", b"")])
    assert "control characters" in refusal(path)


def test_every_limit_is_explicit_and_configurable(tmp_path):
    """A refusal names the Limits field; raising that field admits the file (no hidden constant)."""
    deep = next(c for c in CASES if c.name == "deep_json_meta").build(tmp_path)
    assert "max_nesting_depth=32" in refusal(deep)
    path = tmp_path / "w8.pt"
    save_encoder(path, Encoder(EncoderSpec(width=8)))
    assert "exceeds limit max_width=4" in refusal(path, limits=Limits(max_width=4))
    assert load_encoder(path, limits=Limits(max_width=8)).spec.width == 8
    assert "limit max_pickle_memo=10" in refusal(path, limits=Limits(max_pickle_memo=10))
    assert "limit max_pickle_ops=100" in refusal(path, limits=Limits(max_pickle_ops=100))
    assert "limit max_zip_members=5" in refusal(path, limits=Limits(max_zip_members=5))
    assert "limit max_tensor_elements=100" in refusal(path, limits=Limits(max_tensor_elements=100))
    assert "limit max_total_elements=1000" in refusal(path, limits=Limits(max_total_elements=1000))
    assert "limit max_file_bytes=1000" in refusal(path, limits=Limits(max_file_bytes=1000))
    assert "limit max_pickle_bytes=100" in refusal(path, limits=Limits(max_pickle_bytes=100))
    assert "zip_expansion_ratio=0.1" in refusal(path, limits=Limits(zip_expansion_ratio=0.1, zip_expansion_slack=1))
    for bad in ({"max_width": 0}, {"max_pickle_ops": -1}, {"max_width": "64"}, {"max_width": True}, {"zip_expansion_ratio": 0.0}):
        with pytest.raises(ConfigError, match="limits."):
            Limits(**bad)


def test_defaults_admit_full_size_encoders(tmp_path):
    """ResNet-50 (torchvision and CIFAR stem) and CIFAR ResNet-18 at full width load under the defaults."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "r50.pth")
    loaded = load_encoder(tmp_path / "r50.pth")
    assert loaded.spec.arch == "resnet50" and loaded.ignored == ("fc.bias", "fc.weight")
    assert torch.equal(loaded.encoder.backbone.layer4[2].conv3.weight, net.layer4[2].conv3.weight)
    save_encoder(tmp_path / "c64.safetensors", Encoder(EncoderSpec(width=64)))
    assert load_encoder(tmp_path / "c64.safetensors").spec.width == 64


def test_stride0_conv1_is_refused_before_any_copy(tmp_path):
    """The storage of the stride-0 conv1 holds one float; nothing may materialise its 27 M."""
    path = next(c for c in CASES if c.name == "stride0_conv1").build(tmp_path)
    assert path.stat().st_size < 300_000
    raw = torch.load(path, weights_only=True)  # torch itself does not object: only views were made
    assert raw["conv1.weight"].shape[0] == HUGE_WIDTH and raw["conv1.weight"].untyped_storage().nbytes() == 4
    assert "declares 27000000 elements over a storage of 1" in refusal(path)
    with pytest.raises(CheckpointError, match="over a storage of 1"):
        read_raw(path)  # the raw reader already refuses it: every caller is protected


def test_code_anywhere_is_refused_even_in_ignored_parts(tmp_path):
    """A payload hidden in the optimizer state (which load_encoder ignores) still refuses the file."""

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    sd = {f"module.{k}": v for k, v in w4_state().items()}
    path = tmp_path / "drupe_evil.pth"
    torch.save({"epoch": 1, "state_dict": sd, "optimizer": {"state": {0: Payload()}}}, path)
    assert "pickled code (global builtins.print)" in refusal(path)


def test_mimic_extras_of_the_right_type_load(tmp_path):
    """The validation admits what the pipeline writes (trigger, mask, uint8 references, int target)."""
    from mimic.triggers import white_patch

    trig = white_patch(4)
    extras = {**trig.to_extras(), "reference_images": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
              "target_class": 3, "note": "kept as is"}  # fmt: skip
    path = tmp_path / "attacked.pt"
    save_encoder(path, Encoder(EncoderSpec(width=4)), extras=extras)
    got = load_encoder(path).extras
    assert got["target_class"] == 3 and got["note"] == "kept as is"
    assert torch.equal(got["trigger_patch"], trig.patch) and torch.equal(got["trigger_mask"], trig.mask)
    torch.save(mimic_payload(extras={"target_class": torch.tensor(5)}), tmp_path / "t.pt")
    assert load_encoder(tmp_path / "t.pt").extras["target_class"] == 5


@pytest.mark.parametrize(
    "extras,words",
    [
        ({"target_class": 3.0}, "must be an integer, got float"),
        ({"target_class": True}, "must be an integer, got bool"),
        ({"target_class": -1}, "class index in [0, 100000)"),
        ({"target_class": torch.tensor([1, 2])}, "must be an integer"),
        ({"trigger_patch": torch.rand(3, 32, 32)}, "trigger_patch without trigger_mask"),
        ({"trigger_patch": torch.rand(3, 32, 32) * 2, "trigger_mask": torch.ones(1, 32, 32)}, "within [0, 1]"),
        ({"trigger_patch": torch.rand(3, 32, 32), "trigger_mask": torch.ones(1, 16, 16)}, "differ in size"),
        ({"trigger_patch": torch.rand(3, 32, 32).to_sparse(), "trigger_mask": torch.ones(1, 32, 32)}, "dense"),
        ({"trigger_patch": torch.full((3, 32, 32), float("nan")), "trigger_mask": torch.ones(1, 32, 32)}, "finite"),
        ({"reference_images": torch.zeros(3, 32, 32, dtype=torch.uint8)}, "shape [N, 3, H, W]"),
        ({"reference_images": "x"}, "must be a tensor, got str"),
    ],
)
def test_wrongly_typed_extras_are_one_line_refusals(tmp_path, extras, words):
    path = save(tmp_path / "bad.pt", mimic_payload(extras=extras))
    msg = refusal(path)
    assert "bad extras" in msg and words in msg, msg


@pytest.mark.parametrize(
    "meta,words",
    [
        ({"x": torch.zeros(2)}, "meta.x is a tensor"),
        ({1.5: "float key"}, "non-string key"),
    ],
)
def test_wrongly_typed_meta_is_refused(tmp_path, meta, words):
    assert words in refusal(save(tmp_path / "m.pt", mimic_payload(meta=meta)))


@pytest.mark.parametrize(
    "mean,std,words",
    [
        ([float("inf"), 0.5, 0.5], None, "mean values must be finite"),
        (None, [0.2, -0.2, 0.2], "std values must be finite, within [0.01, 10]"),
        (None, [0.2, 0.2], "std must be 3 numbers (one per channel), got 2"),
        ([5.0, 0.5, 0.5], None, "within [-1, 1]"),
        ("abc", None, "mean must be 3 numbers"),
        ([0.5, "x", 0.5], None, "mean must be 3 numbers, got a str"),
    ],
)
def test_bad_normalisation_in_metadata_is_refused(tmp_path, mean, std, words):
    spec = EncoderSpec(width=4).to_meta()
    spec.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    for ext in ("pt", "safetensors"):
        path = tmp_path / f"n.{ext}"
        if ext == "pt":
            save(path, mimic_payload(spec=spec))
        else:
            from safetensors.torch import save_file

            save_file(w4_state(), str(path), metadata={"format": "mimic-encoder", "version": "1", "spec": json.dumps(spec), "meta": "{}"})
        msg = refusal(path)
        assert "bad encoder spec in file metadata" in msg and words in msg, msg


def test_bad_normalisation_from_the_caller_is_a_config_error(tmp_path):
    torch.save(w4_state(), tmp_path / "tv.pt")
    with pytest.raises(ConfigError, match="std values must be finite"):
        load_encoder(tmp_path / "tv.pt", std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="mean must be 3 numbers"):
        load_encoder(tmp_path / "tv.pt", mean=(0.5, 0.5))


def test_files_differing_only_in_normalisation_get_different_fingerprints(tmp_path):
    a = tmp_path / "a.pt"
    b = tmp_path / "b.pt"
    save(a, mimic_payload())
    save(b, mimic_payload(spec={**EncoderSpec(width=4).to_meta(), "std": [0.2023, 0.1994, 0.2011]}))
    assert load_encoder(a).spec.std != load_encoder(b).spec.std
    assert fingerprint_file(a) != fingerprint_file(b)


def test_case_alias_is_refused_whichever_record_comes_first(tmp_path):
    """An aliased DATA.PKL holding code: refused as ambiguous before either pickle is read, whether
    the alias is the first record of the archive (the one torch takes its root from) or the last."""
    import zipfile

    evil = b"\x80\x02cbuiltins\nprint\nq\x00X\x05\x00\x00\x00pwnedq\x01\x85q\x02Rq\x03."
    benign = tmp_path / "benign.pt"
    torch.save({"w": torch.zeros(4)}, benign)
    with zipfile.ZipFile(benign) as z:
        records = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    alias = (records[0][0].split("/")[0] + "/DATA.PKL", evil)  # torch names the root after the file: benign/
    for alias_first in (True, False):
        path = tmp_path / f"alias_{alias_first}.pt"
        ordered = [alias, *records] if alias_first else [*records, alias]
        with zipfile.ZipFile(path, "w") as z:
            for name, data in ordered:
                z.writestr(name, data)
        msg = refusal(path)
        assert "records whose names differ only in case" in msg and "DATA.PKL" in msg, msg


def test_what_torch_reads_is_rebuilt_from_the_scanned_records(tmp_path, monkeypatch):
    """torch.load never sees the file's own bytes: it gets the archive rebuilt from the records read."""
    from mimic.checkpoints import reader

    seen: list[bytes] = []
    real = reader.torch_load
    monkeypatch.setattr(reader, "torch_load", lambda data, source: seen.append(data) or real(data, source))
    path = tmp_path / "e.pt"
    save_encoder(path, Encoder(EncoderSpec(width=4)))
    load_encoder(path)
    assert len(seen) == 1 and seen[0] != path.read_bytes()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(seen[0])) as rebuilt, zipfile.ZipFile(path) as original:
        assert rebuilt.namelist() == original.namelist()
        assert all(rebuilt.read(n) == original.read(n) for n in original.namelist())
        assert {i.compress_type for i in rebuilt.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.slow
def test_refusals_stay_under_the_rss_bound(tmp_path):
    """Every hostile case in a fresh process: refused as expected, peak RSS < 300 MB above baseline."""
    out = tmp_path / "hostile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_hostile.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    report = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert report["ok"] and report["worst_refusal_delta_mb"] < 300
    assert {r["case"] for r in report["rows"]} >= {c.name for c in CASES}
    assert all(r["as_expected"] for r in report["rows"]), [r for r in report["rows"] if not r["as_expected"]]


def test_a_teacher_swapped_mid_audit_cannot_poison_a_cache(tmp_path, monkeypatch):
    """Issue 12, point 6: the teacher is read once; what was loaded is what was hashed, and every later
    stage reads a content-addressed copy, so replacing the original path at any moment either fails
    the audit in one line or changes nothing."""
    import mimic.inputs as inputs
    from mimic.errors import DataError

    a, b = tmp_path / "teacher.pt", tmp_path / "other.pt"
    save_encoder(a, Encoder(EncoderSpec(width=4)).eval())
    torch.manual_seed(1)
    save_encoder(b, Encoder(EncoderSpec(width=4)).eval())
    want_sha = inputs.file_sha256(a)

    # swapped between hashing and loading: refused, never cached under the first file's hash
    real_load = inputs.load_encoder

    def swap_then_load(path, **kw):
        Path(path).write_bytes(b.read_bytes())
        return real_load(path, **kw)

    victim = tmp_path / "victim.pt"
    victim.write_bytes(a.read_bytes())
    monkeypatch.setattr(inputs, "load_encoder", swap_then_load)
    with pytest.raises(DataError, match="changed while it was being read"):
        inputs.admit_teacher(victim)
    monkeypatch.setattr(inputs, "load_encoder", real_load)

    # swapped after admission, before the copy: refused
    victim.write_bytes(a.read_bytes())
    admitted = inputs.admit_teacher(victim)
    assert admitted.sha256 == want_sha == admitted.loaded.sha256
    victim.write_bytes(b.read_bytes())
    with pytest.raises(DataError, match="changed while it was being read"):
        inputs.keep_copy(admitted, tmp_path / "copies")
    assert not list((tmp_path / "copies").glob("*"))

    # swapped after the copy: every stage reads the copy, which holds the hashed bytes
    victim.write_bytes(a.read_bytes())
    kept = inputs.keep_copy(admitted, tmp_path / "copies")
    victim.write_bytes(b.read_bytes())
    assert kept.path != victim and inputs.file_sha256(kept.path) == want_sha
    assert inputs.admit_teacher(kept.path).fingerprint == admitted.fingerprint
    assert inputs.admit_teacher(victim).fingerprint != admitted.fingerprint
