"""Property-based fuzzing of the loader (issue 12 point 8).

Valid checkpoints of every supported format (mimic ``.pt``, research ``.pth`` with an optimizer,
torchvision state dict, safetensors, mimic safetensors) are mutated -- truncated, bytes flipped or
inserted, zip records spliced (swapped, duplicated, renamed, dropped, pickle rewritten and the
archive re-zipped with valid CRCs so the mutation reaches the pickle scan and torch), safetensors
headers and metadata rewritten, mimic's spec/meta/extras replaced by arbitrary plain data -- and
every case must end in a loaded encoder or a one-line CheckpointError naming the file: never
another exception, never the last-resort "unexpected error" boundary, and never more than 300 MB
above the baseline (peak RSS over the whole run, VmHWM). The fast suite runs a few hundred cases
(derandomized, reproducible); ``-m slow`` runs 1,000 per format with fresh randomness.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from hostile import mimic_payload
from mimic.checkpoints import LoadedEncoder, load_encoder
from mimic.checkpoints.load import UNEXPECTED
from mimic.encoders import Encoder, EncoderSpec, ProjectionHead
from mimic.errors import CheckpointError
from mimic.triggers import white_patch

pytestmark = pytest.mark.usefixtures("one_thread")

FAST, SLOW = 60, 1000
RSS_BOUND_MB = 300
RESEARCH = {"conv1": "f.f.0", "bn1": "f.f.1", "layer1": "f.f.3", "layer2": "f.f.4", "layer3": "f.f.5", "layer4": "f.f.6"}
OPCODES = [b"\x94", b"h\x00", b"(", b"t", b"0", b"]", b"a", b"}", b"s", b"R", b"Q", b"\x93", b"c", b"\x8c\x03abc",
           b"J\xff\xff\xff\x7f", b"K\x00", b"N", b"1", b"2", b"e", b"u", b"\x85", b"\x86", b"\x87", b"."]  # fmt: skip


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key)).split()[1]) / 1024


class PeakRSS:
    """Peak RSS above the RSS at entry (Linux: VmHWM reset through /proc/self/clear_refs)."""

    def __enter__(self) -> "PeakRSS":
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.delta = _status_mb("VmHWM") - self.base


# ------------------------------------------------------------------------------------ seed files


def _seeds() -> dict[str, bytes]:
    torch.manual_seed(0)
    enc = Encoder(EncoderSpec(width=4)).eval()
    sd = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    research = {f"{RESEARCH[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    research |= {f"g.{k}": v.clone() for k, v in ProjectionHead(32, 8).state_dict().items()}
    opt = {"state": {0: {"momentum_buffer": torch.randn(4, 3, 3, 3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    out: dict[str, bytes] = {}

    def torch_bytes(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    extras = {**white_patch(4).to_extras(), "target_class": 2, "reference_images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8)}
    ours = mimic_payload(spec=enc.spec.to_meta(), state_dict=sd, meta={"stage": "attack", "history": [{"loss": 1.0}]}, extras=extras)
    out["mimic_pt"] = torch_bytes(ours)
    out["research_pth"] = torch_bytes({"epoch": 200, "state_dict": {f"module.{k}": v for k, v in research.items()}, "optimizer": opt})
    out["torchvision_pt"] = torch_bytes(sd | {"fc.weight": torch.randn(10, 32), "fc.bias": torch.randn(10)})
    out["safetensors"] = st_save({k: v.contiguous() for k, v in research.items()})
    out["mimic_safetensors"] = st_save(
        sd, metadata={"format": "mimic-encoder", "version": "1", "spec": json.dumps(enc.spec.to_meta()), "meta": '{"a": [1]}'}
    )
    return out


SEEDS = _seeds()


# ------------------------------------------------------------------------------------ mutations


def _truncate(draw: Callable, data: bytes) -> bytes:
    return data[: draw(st.integers(0, max(len(data) - 1, 0)))]


def _flip(draw: Callable, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(out) - 1))
        out[pos] ^= draw(st.integers(1, 255))
    return bytes(out)


def _insert(draw: Callable, data: bytes) -> bytes:
    pos = draw(st.integers(0, len(data)))
    return data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]


def _records(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(i.filename, z.read(i)) for i in z.infolist()]
    except Exception:  # noqa: BLE001 - an earlier mutation broke the archive: nothing to splice
        return None


def _zip(records: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        with zipfile.ZipFile(buf, "w") as z:
            for name, blob in records:
                z.writestr(name, blob)
    return buf.getvalue()


def _mutate_pickle(draw: Callable, pkl: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "opcode", "delete"]))
    if how == "flip" and pkl:
        return _flip(draw, pkl)
    if how == "truncate":
        return _truncate(draw, pkl)
    pos = draw(st.integers(0, len(pkl)))
    if how == "opcode":
        return pkl[:pos] + b"".join(draw(st.lists(st.sampled_from(OPCODES), min_size=1, max_size=6))) + pkl[pos:]
    return pkl[:pos] + pkl[pos + draw(st.integers(1, 8)) :]


def _splice(draw: Callable, data: bytes) -> bytes:
    records = _records(data)
    if not records:
        return _flip(draw, data)
    i = draw(st.integers(0, len(records) - 1))
    name, blob = records[i]
    how = draw(st.sampled_from(["pickle", "swap", "duplicate", "case", "rename", "drop", "reorder", "content"]))
    if how == "pickle":
        j = next((k for k, (n, _) in enumerate(records) if n.endswith("data.pkl")), i)
        records[j] = (records[j][0], _mutate_pickle(draw, records[j][1]))
    elif how == "swap":
        j = draw(st.integers(0, len(records) - 1))
        records[i], records[j] = (name, records[j][1]), (records[j][0], blob)
    elif how == "duplicate":
        records.insert(draw(st.integers(0, len(records))), (name, draw(st.sampled_from([blob, records[0][1], b""]))))
    elif how == "case":
        records.append((name.upper() if draw(st.booleans()) else name.swapcase(), blob))
    elif how == "rename":
        records[i] = (draw(st.sampled_from([f"other/{name.split('/', 1)[-1]}", name + ".pkl", name.split("/")[-1], name + "/x"])), blob)
    elif how == "drop":
        del records[i]
    elif how == "reorder":
        records = draw(st.permutations(records))
    else:
        records[i] = (name, _mutate_pickle(draw, blob) if blob else draw(st.binary(max_size=64)))
    return _zip(records) if records else b""


_INTERESTING_INTS = st.sampled_from([0, 1, -1, 3, 4, 7, 63, 64, 129, 2**31, 2**32 + 1, 2**53, 2**63 - 1, 2**64, -(2**63)])
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | _INTERESTING_INTS
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def _spec_values(draw: Callable) -> dict:
    spec = dict(EncoderSpec(width=4).to_meta())
    key = draw(st.sampled_from(["arch", "width", "mean", "std", "extra", "drop"]))
    if key == "drop":
        spec.pop(draw(st.sampled_from(sorted(spec))))
    elif key in ("mean", "std"):
        spec[key] = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True) | _INTERESTING_INTS, max_size=5) | _JSONISH)
    elif key == "arch":
        spec[key] = draw(st.sampled_from(["cifar_resnet50", "resnet18", "resnet50", "vit", ""]) | _JSONISH)
    else:
        spec[key] = draw(_INTERESTING_INTS | _JSONISH)
    return spec


def _header(draw: Callable, data: bytes) -> bytes:
    """Rewrite the safetensors JSON header (tensor entries or metadata), keeping the data section."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except Exception:  # noqa: BLE001 - an earlier mutation broke it
        return _flip(draw, data)
    body = data[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    how = draw(st.sampled_from(["shape", "dtype", "offsets", "drop", "add", "metadata", "spec", "length", "nest"]))
    name = draw(st.sampled_from(names)) if names else "x"
    entry = header.get(name)
    if not isinstance(entry, dict):
        entry = header[name] = {}
    if how == "shape" and isinstance(entry.get("shape"), list) and entry["shape"]:
        entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(_INTERESTING_INTS)
    elif how == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "OBJ", ""]))
    elif how == "offsets":
        entry["data_offsets"] = [draw(_INTERESTING_INTS), draw(_INTERESTING_INTS)]
    elif how == "drop":
        header.pop(name, None)
    elif how == "add":
        header[draw(st.text(max_size=12))] = draw(_JSONISH)
    elif how in ("metadata", "spec"):
        md = header.setdefault("__metadata__", {})
        if how == "spec":
            md["spec"] = json.dumps(_spec_values(draw))
        else:
            md[draw(st.sampled_from(["format", "version", "meta", "spec", "other"]))] = draw(
                st.sampled_from(["mimic-encoder", "{", "[]", '{"a": NaN}', "1"]) | st.text(max_size=12)
            )
    elif how == "nest":
        depth = draw(st.integers(1, 200))
        header[name] = json.loads("[" * depth + "]" * depth)
    raw = json.dumps(header).encode()
    length = draw(st.sampled_from([len(raw), len(raw) + 1, len(raw) - 1, 0, 2**40])) if how == "length" else len(raw)
    return struct.pack("<Q", length) + raw + body


ZIP_OPS = [_truncate, _flip, _insert, _splice, _splice]
ST_OPS = [_truncate, _flip, _insert, _header, _header]


@st.composite
def mutated(draw: Callable, fmt: str) -> bytes:
    ops = ST_OPS if "safetensors" in fmt else ZIP_OPS
    data = SEEDS[fmt]
    for op in draw(st.lists(st.sampled_from(ops), min_size=1, max_size=3)):
        if data:
            data = op(draw, data)
    return data


@st.composite
def payloads(draw: Callable) -> dict:
    """Our own .pt format with spec, meta and extras rewritten by arbitrary (weights-only) values."""
    tensors = st.sampled_from([torch.rand(3, 32, 32), torch.ones(1, 32, 32), torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                               torch.tensor(3), torch.tensor([1.0, float("nan")]), torch.zeros(0), torch.rand(3, 4, 4) * 5])  # fmt: skip
    values = _JSONISH | tensors
    extras = draw(st.dictionaries(st.sampled_from(["target_class", "trigger_patch", "trigger_mask", "reference_images", "x"]),
                                  values | _INTERESTING_INTS, max_size=4))  # fmt: skip
    meta = draw(st.dictionaries(st.text(max_size=5) | _INTERESTING_INTS, values, max_size=3))
    payload = mimic_payload(spec=_spec_values(draw), meta=meta, extras=extras)
    field = draw(st.sampled_from(["none", "version", "format", "state_dict", "meta", "extras"]))
    if field != "none":
        payload[field] = draw(_JSONISH)
    return payload


# ------------------------------------------------------------------------------------ the property


def _check(path: Path) -> str:
    """Load ``path``: a LoadedEncoder or a one-line CheckpointError naming the file, nothing else."""
    try:
        loaded = load_encoder(path)
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg, msg
        assert msg.startswith(f"{path}: "), msg
        assert UNEXPECTED not in msg, msg
        return "refused"
    assert isinstance(loaded, LoadedEncoder) and not loaded.encoder.training
    return "loaded"


def _fuzz(fmt: str, examples: int, work: Path, derandomize: bool) -> dict[str, int]:
    outcomes = {"loaded": 0, "refused": 0}
    path = work / f"fuzz_{fmt}.bin"

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=payloads() if fmt == "mimic_payload" else mutated(fmt))
    def run(data: bytes | dict) -> None:
        if isinstance(data, dict):
            torch.save(data, path)
        else:
            path.write_bytes(data)
        outcomes[_check(path)] += 1

    run()
    return outcomes


FORMATS = [*SEEDS, "mimic_payload"]


def test_seeds_are_valid(tmp_path):
    for fmt, data in SEEDS.items():
        (tmp_path / fmt).write_bytes(data)
        assert _check(tmp_path / fmt) == "loaded", fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_fast(tmp_path, fmt):
    with PeakRSS() as rss:
        outcomes = _fuzz(fmt, FAST, tmp_path, derandomize=True)
    assert sum(outcomes.values()) >= FAST // 2 and outcomes["refused"] > 0, outcomes
    assert rss.delta < RSS_BOUND_MB, f"peak RSS {rss.delta:.0f} MB above baseline"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_slow(tmp_path, fmt):
    with PeakRSS() as rss:
        outcomes = _fuzz(fmt, SLOW, tmp_path, derandomize=False)
    assert sum(outcomes.values()) >= SLOW, outcomes
    assert rss.delta < RSS_BOUND_MB, f"peak RSS {rss.delta:.0f} MB above baseline"
