"""Builders of hostile model files (issue 12), shared by tests/test_hostile_files.py and
benchmarks/bench_hostile.py. Every file is made on the fly in a temporary directory; none is
committed. Each case names the refusal it must get; sizes that the old loader would have tried to
allocate are astronomically large on purpose, so a regression fails fast (the allocation is
refused by the OS) instead of swapping the machine."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from mimic.encoders import Encoder, EncoderSpec

HUGE_WIDTH = 1_000_000  # a CIFAR ResNet-18 this wide would need ~10^15 bytes


def w4_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in Encoder(EncoderSpec(width=4)).backbone.state_dict().items()}


def mimic_payload(spec: dict | None = None, state_dict: dict | None = None, meta: dict | None = None,
                  extras: dict | None = None) -> dict:  # fmt: skip
    """Our own ``.pt`` layout, written with torch.save directly (save_encoder would refuse these)."""
    return {"format": "mimic-encoder", "version": 1, "spec": spec or EncoderSpec(width=4).to_meta(),
            "state_dict": w4_state() if state_dict is None else state_dict, "meta": meta or {}, "extras": extras or {}}  # fmt: skip


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def zip_with(path: Path, replace: dict[str, bytes] | None = None, add: list[tuple[str, bytes]] | None = None) -> Path:
    """A valid torch zip of ``{"w": zeros(4)}`` with records replaced (by suffix) or added."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we add on purpose
        with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                for suffix, new in (replace or {}).items():
                    if info.filename.endswith(suffix):
                        data = new
                zout.writestr(info.filename, data)
            for name, data in add or []:
                zout.writestr(name, data)
    return path


def _data_pkl() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(buf) as z:
        return z.read("archive/data.pkl")


def st_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


# ---------------------------------------------------------------------------------------- builders


def meta_width_bomb(d: Path) -> Path:
    """2 KB: metadata declares width 10^6, no conv1 to contradict it (the old loader built it)."""
    return save(d / "meta_width.pt", mimic_payload(spec={"arch": "cifar_resnet18", "width": HUGE_WIDTH},
                                                   state_dict={"x": torch.zeros(1)}))  # fmt: skip


def meta_width_at_limit(d: Path) -> Path:
    """The worst a file can make mimic build under the default limits: width 128, no weights."""
    return save(d / "meta_width128.pt", mimic_payload(spec={"arch": "cifar_resnet18", "width": 128},
                                                      state_dict={"x": torch.zeros(1)}))  # fmt: skip


def stride0_conv1(d: Path) -> Path:
    """conv1 as a stride-0 view of one element: tiny storage, 27 M declared elements, width 10^6."""
    sd = w4_state()
    sd["conv1.weight"] = torch.zeros(1).expand(HUGE_WIDTH, 3, 3, 3)
    return save(d / "stride0.pt", sd)


def stride0_huge(d: Path) -> Path:
    """A stride-0 tensor declaring 2^50 elements (beyond any per-tensor limit)."""
    return save(d / "stride0_huge.pt", {"w": torch.zeros(1).expand(1 << 25, 1 << 25)})


def stride0_extras(d: Path) -> Path:
    """reference_images as a stride-0 view: 10 000 images over one byte."""
    ref = torch.zeros(1, dtype=torch.uint8).expand(10_000, 3, 32, 32)
    return save(d / "stride0_extras.pt", mimic_payload(extras={"reference_images": ref}))


def typed_target_class(d: Path) -> Path:
    return save(d / "target_str.pt", mimic_payload(extras={"target_class": "3"}))


def typed_trigger_patch(d: Path) -> Path:
    return save(d / "patch_str.pt", mimic_payload(extras={"trigger_patch": "x", "trigger_mask": torch.ones(1, 32, 32)}))


def typed_trigger_mask(d: Path) -> Path:
    return save(d / "mask_shape.pt", mimic_payload(extras={"trigger_patch": torch.rand(3, 32, 32),
                                                           "trigger_mask": torch.ones(32, 32)}))  # fmt: skip


def typed_reference_images(d: Path) -> Path:
    return save(d / "reference.pt", mimic_payload(extras={"reference_images": torch.full((2, 3, 32, 32), 7.0)}))


def deep_json_header(d: Path) -> Path:
    """A safetensors header nesting 100 000 arrays (json.loads: RecursionError)."""
    n = 100_000
    header = b'{"a":{"dtype":"F32","shape":' + b"[" * n + b"]" * n + b',"data_offsets":[0,0]}}'
    return st_file(d / "deep.safetensors", header)


def deep_json_meta(d: Path) -> Path:
    """mimic safetensors whose ``meta`` JSON string nests 100 000 arrays."""
    n = 100_000
    md = {"format": "mimic-encoder", "version": "1", "spec": json.dumps(EncoderSpec(width=4).to_meta()),
          "meta": "[" * n + "]" * n}  # fmt: skip
    path = d / "deep_meta.safetensors"
    path.write_bytes(st_save(w4_state(), metadata=md))
    return path


def memo_bomb(d: Path) -> Path:
    """5 MB data.pkl of MEMOIZE/BINGET churn: 1.25 M memo entries."""
    pkl = b"\x80\x04}\x94" + b"h\x00\x940" * 1_250_000 + b"."
    return zip_with(d / "memo.pt", replace={"/data.pkl": pkl})


def ops_bomb(d: Path) -> Path:
    """6 MB data.pkl appending 3 M empty lists (the unpickler would hold ~200 MB of lists)."""
    pkl = b"\x80\x04]" + b"]a" * 3_000_000 + b"."
    return zip_with(d / "ops.pt", replace={"/data.pkl": pkl})


def deep_pickle(d: Path) -> Path:
    """Lists nested 100 000 deep (recursive code downstream: RecursionError)."""
    n = 100_000
    return zip_with(d / "deep.pt", replace={"/data.pkl": b"\x80\x04" + b"]" * n + b"a" * (n - 1) + b"."})


def cyclic_pickle(d: Path) -> Path:
    """A list that contains itself (recursive code downstream would never end)."""
    loop: list = []
    loop.append(loop)
    return save(d / "cycle.pt", mimic_payload(meta={"history": loop}))


def case_alias(d: Path) -> Path:
    """``data.pkl`` also present as ``DATA.PKL`` (torch's lookup ignores case)."""
    other = _data_pkl().replace(b"\x89", b"\x88")  # requires_grad=True: a different, benign pickle
    return zip_with(d / "alias.pt", add=[("archive/DATA.PKL", other)])


def duplicate_record(d: Path) -> Path:
    return zip_with(d / "dup.pt", add=[("archive/data.pkl", _data_pkl())])


def two_roots(d: Path) -> Path:
    return zip_with(d / "roots.pt", add=[("other/version", b"3\n")])


def two_pickles(d: Path) -> Path:
    return zip_with(d / "pickles.pt", add=[("archive/extra.pkl", _data_pkl())])


def zip_members_bomb(d: Path) -> Path:
    """20 000 empty records (zipfile would build one object per record before any check)."""
    return zip_with(d / "members.pt", add=[(f"archive/pad/{i}", b"") for i in range(20_000)])


def zip_bomb(d: Path) -> Path:
    """A ~64 KB archive whose storage record inflates to 64 MiB."""
    path = d / "zipbomb.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("data/0"):
                bomb = zipfile.ZipInfo(info.filename)
                bomb.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(bomb, "w", force_zip64=True) as fh:
                    for _ in range(64):
                        fh.write(bytes(1 << 20))
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    return path


def storage_numel_lie(d: Path) -> Path:
    """data.pkl declares a 10^9-element storage for a 16-byte record."""
    pkl = _data_pkl().replace(b"K\x04t", b"J" + (10**9).to_bytes(4, "little") + b"t")
    return zip_with(d / "numel.pt", replace={"/data.pkl": pkl})


def legacy_alloc_bomb(d: Path) -> Path:
    """Legacy (pre-1.6) file declaring an 8 GB storage: its loader allocates before reading."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue().replace(b"cpuq\x06K\x04N", b"cpuq\x06J" + struct.pack("<i", 2_000_000_000) + b"N")
    path = d / "legacy.pt"
    path.write_bytes(data)
    return path


def safetensors_zero_huge(d: Path) -> Path:
    """A safetensors tensor of shape [0, 2^60]: zero bytes, absurd dimensions."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [0, 1 << 60], "data_offsets": [0, 0]}}).encode()
    return st_file(d / "zero_huge.safetensors", header)


def norm_nan(d: Path) -> Path:
    return save(d / "norm_nan.pt", mimic_payload(spec={**EncoderSpec(width=4).to_meta(), "mean": [float("nan"), 0.5, 0.5]}))


def norm_zero_std(d: Path) -> Path:
    return save(d / "norm_std0.pt", mimic_payload(spec={**EncoderSpec(width=4).to_meta(), "std": [0.2, 0.0, 0.2]}))


def norm_channels(d: Path) -> Path:
    return save(d / "norm_4ch.pt", mimic_payload(spec={**EncoderSpec(width=4).to_meta(), "mean": [0.5] * 4}))


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    expect: str  # a substring of the one-line refusal

    @property
    def what(self) -> str:
        return (self.build.__doc__ or self.name).strip().split("\n")[0]


CASES = [
    Case("meta_width_bomb", meta_width_bomb, "limit max_width=128"),
    Case("meta_width_at_limit", meta_width_at_limit, "keys do not match cifar_resnet18-w128"),
    Case("stride0_conv1", stride0_conv1, "declares 27000000 elements over a storage of 1"),
    Case("stride0_huge", stride0_huge, "limit max_tensor_elements="),
    Case("stride0_extras", stride0_extras, "'extras.reference_images' declares 30720000 elements over a storage of 1"),
    Case("typed_target_class", typed_target_class, "bad extras: extras['target_class'] must be an integer, got str"),
    Case("typed_trigger_patch", typed_trigger_patch, "bad extras: extras['trigger_patch'] must be a tensor, got str"),
    Case("typed_trigger_mask", typed_trigger_mask, "bad extras: extras['trigger_mask'] must have shape [1, H, W]"),
    Case("typed_reference_images", typed_reference_images, "extras['reference_images'] values must be finite and within [0, 1]"),
    Case("deep_json_header", deep_json_header, "safetensors header nests deeper than limit max_nesting_depth=32"),
    Case("deep_json_meta", deep_json_meta, "mimic-encoder meta nests deeper than limit max_nesting_depth=32"),
    Case("memo_bomb", memo_bomb, "exceeds limit max_pickle_memo=100000"),
    Case("ops_bomb", ops_bomb, "exceeds limit max_pickle_ops=2000000"),
    Case("deep_pickle", deep_pickle, "nests deeper than 32 levels (limit max_nesting_depth=32)"),
    Case("cyclic_pickle", cyclic_pickle, "contains itself (a cyclic structure)"),
    Case("case_alias", case_alias, "records whose names differ only in case"),
    Case("duplicate_record", duplicate_record, "duplicate records"),
    Case("two_roots", two_roots, "several top-level directories"),
    Case("two_pickles", two_pickles, "2 pickle records"),
    Case("zip_members_bomb", zip_members_bomb, "exceeds limit max_zip_members=10000"),
    Case("zip_bomb", zip_bomb, "zip bomb"),
    Case("storage_numel_lie", storage_numel_lie, "does not match expected size"),
    Case("legacy_alloc_bomb", legacy_alloc_bomb, "legacy (pre-1.6, non-zip) format"),
    Case("safetensors_zero_huge", safetensors_zero_huge, "dimension of safetensors tensor 'a' (1152921504606846976) exceeds limit max_tensor_elements="),
    Case("norm_nan", norm_nan, "mean values must be finite"),
    Case("norm_zero_std", norm_zero_std, "std values must be finite, within [0.01, 10]"),
    Case("norm_channels", norm_channels, "mean must be 3 numbers (one per channel), got 4"),
]
