"""``read_raw``: any supported model file -> plain containers and tensors, without executing code.

The file is read once into memory (after ``stat`` says it is a regular file within
``max_file_bytes``), its format is sniffed from magic bytes, pickles are scanned
(:mod:`~mimic.checkpoints.pickle_scan`), zip archives validated and rebuilt
(:mod:`~mimic.checkpoints.archive`), safetensors headers validated
(:mod:`~mimic.checkpoints.safetensors_header`); the load itself is
``torch.load(weights_only=True, map_location="cpu")``. Before anything touches a loaded tensor,
:func:`check_loaded` walks the result without recursion and refuses deep or cyclic containers and
tensors whose declared shape exceeds their storage (a stride-0 view of one element can declare
10^15 elements: any copy, ``isfinite`` or ``clone`` would allocate them).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mimic.checkpoints.archive import TorchZip
from mimic.checkpoints.limits import DEFAULT_LIMITS, Limits
from mimic.checkpoints.messages import code_refusal, fail, over_limit, printable
from mimic.checkpoints.pickle_scan import PickleScan, refuse_code, scan_pickle
from mimic.checkpoints.safetensors_header import read_safetensors
from mimic.checkpoints.walk import WalkError, walk
from mimic.checkpoints.sniff import REWRITE_HINT, TORCH_LEGACY_MAGIC, refuse_npy, refuse_tar, refuse_unknown, sniff

PLAIN_PICKLE = "a plain Python pickle, not a PyTorch checkpoint; re-save it with torch.save or safetensors"


def torch_load(data: bytes, source: str) -> object:
    """``torch.load`` with the restricted unpickler; every failure becomes a CheckpointError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any library failure is a bad file
        msg = str(exc)
        hit = re.search(r"GLOBAL ([\w.<>]+)", msg)
        if hit:
            raise code_refusal(source, [printable(hit.group(1))]) from None
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            reasons = [ln for ln in lines[1:] if not ln.startswith("Check the documentation")]
            reason = printable(reasons[0] if reasons else "unsupported content", 200)
            raise fail(source, f"refused by PyTorch's weights-only loader: {reason}") from None
        first = printable(lines[0] if lines else type(exc).__name__, 200)
        raise fail(source, f"cannot read PyTorch checkpoint (corrupt or truncated file?): {first}") from None


def _scan(data: bytes, source: str, limits: Limits, start: int = 0) -> PickleScan:
    scan = scan_pickle(data, source, limits, start)
    refuse_code(scan, source)
    return scan


def _read_zip(data: bytes, source: str, limits: Limits) -> bytes:
    """The archive torch will read: rebuilt from exactly the records that were scanned."""
    archive = TorchZip(data, source, limits)
    scan = _scan(archive.read_pickle(), source, limits)
    if scan.error:
        raise fail(source, f"corrupt data.pkl in zip archive ({printable(scan.error, 120)})")
    return archive.rebuild()


def _refuse_pickle_stream(data: bytes, source: str, limits: Limits) -> Exception:
    """A protocol-2+ pickle: torch's legacy (pre-1.6, non-zip) format, or a plain Python pickle."""
    first = _scan(data, source, limits)
    if first.error is None and first.first_value == TORCH_LEGACY_MAGIC:
        # magic number, protocol version, sys info, the object, storage keys; then raw storage bytes
        pos = first.end
        for _ in range(4):
            scan = _scan(data, source, limits, pos)
            if scan.error:
                raise fail(source, f"truncated or corrupt legacy PyTorch file ({printable(scan.error, 120)})")
            pos = scan.end
        return fail(
            source,
            "refused: PyTorch's legacy (pre-1.6, non-zip) format, whose loader allocates every storage at "
            f"the size the file declares; {REWRITE_HINT}",
        )
    if first.error:
        return fail(source, f"truncated or corrupt pickle ({printable(first.error, 120)})")
    return fail(source, PLAIN_PICKLE)


def _refuse_other(data: bytes, source: str, limits: Limits) -> Exception:
    """No magic number matched: a protocol 0/1 pickle, text, or something else entirely."""
    scan = _scan(data, source, limits)
    if scan.error is None and scan.end >= len(data) - 1:
        return fail(source, PLAIN_PICKLE)
    return refuse_unknown(data, source)


def read_bytes(path: str | os.PathLike[str], limits: Limits) -> bytes:
    """The whole file, after checking it is a regular file within ``max_file_bytes``."""
    source = os.fspath(path)
    p = Path(path)
    try:
        if not p.exists():
            raise fail(source, "no such file")
        if p.is_dir():
            raise fail(source, "is a directory, not a model file")
        if not p.is_file():  # a FIFO or device would block or never end
            raise fail(source, "not a regular file (a pipe, socket or device?)")
        size = p.stat().st_size
        if size > limits.max_file_bytes:
            raise over_limit(source, "file bytes", size, "max_file_bytes", limits.max_file_bytes)
        with p.open("rb") as fh:
            data = fh.read(limits.max_file_bytes + 1)  # the file may have grown since stat
    except OSError as exc:
        raise fail(source, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    if len(data) > limits.max_file_bytes:
        raise over_limit(source, "file bytes", len(data), "max_file_bytes", limits.max_file_bytes)
    if not data:
        raise fail(source, "empty file (0 bytes)")
    return data


def read_raw(path: str | os.PathLike[str], limits: Limits | None = None) -> object:
    """Read any supported model file without executing code from it.

    Returns the unpickled object (plain containers and tensors only) for PyTorch files and a
    :class:`SafetensorsContent` for safetensors files. Raises CheckpointError otherwise.
    """
    return read_raw_hashed(path, limits)[0]


def read_raw_hashed(path: str | os.PathLike[str], limits: Limits | None = None) -> tuple[object, str]:
    """:func:`read_raw`, plus the SHA-256 of the very bytes that were read (the file is read once):
    what was loaded is provably what was hashed, whatever happens to the path afterwards."""
    limits = limits or DEFAULT_LIMITS
    source = os.fspath(path)
    box = [read_bytes(path, limits)]  # _parse takes the only reference, so it can drop the bytes early
    sha256 = hashlib.sha256(box[0]).hexdigest()
    return _parse(box, source, limits), sha256


def _parse(box: list[bytes], source: str, limits: Limits) -> object:
    data = box.pop()
    kind = sniff(data)
    if kind == "safetensors":
        raw: object = read_safetensors(data, source, limits)
        check_loaded(raw.tensors, source, limits)
        return raw
    if kind == "npy":
        raise refuse_npy(data, source)
    if kind == "tar":
        raise refuse_tar(data, source, limits.max_zip_members)
    if kind == "gzip":
        raise fail(source, "a gzip-compressed file; decompress it first")
    if kind == "pickle":
        raise _refuse_pickle_stream(data, source, limits)
    if kind != "zip":
        raise _refuse_other(data, source, limits)
    archive = _read_zip(data, source, limits)
    del data  # torch reads the rebuilt archive; keep one copy of the file in memory, not two
    raw = torch_load(archive, source)
    del archive
    check_loaded(raw, source, limits)
    return raw


def _check_tensor(t: Tensor, where: str, source: str, limits: Limits) -> int:
    n = t.numel()
    if n > limits.max_tensor_elements:
        raise over_limit(source, f"elements of tensor {where}", n, "max_tensor_elements", limits.max_tensor_elements)
    if t.layout != torch.strided or t.is_meta or getattr(t, "is_nested", False) or t.is_quantized or n == 0:
        return n  # no data of their own to read past (refused by name later where they matter)
    if any(s < 0 for s in t.stride()):
        raise fail(source, f"refused: tensor {where} has negative strides")
    available = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    if n > available:
        raise fail(
            source,
            f"refused: tensor {where} declares {n} elements over a storage of {max(available, 0)} "
            "(a stride-0 or overlapping view); copying it would allocate the declared size",
        )
    return n


def check_loaded(obj: object, source: str, limits: Limits) -> None:
    """Walk a loaded object without recursion: nesting depth, cycles, and tensor sizes vs storage."""
    total = 0
    try:
        for where, value, _is_key in walk(obj, "", limits.max_nesting_depth):
            if isinstance(value, Tensor):
                total += _check_tensor(value, repr(where.lstrip(".")), source, limits)
                if total > limits.max_total_elements:
                    raise over_limit(
                        source, "tensor elements in the file", total, "max_total_elements", limits.max_total_elements
                    )
    except WalkError as exc:
        bound = f" (limit max_nesting_depth={limits.max_nesting_depth})" if "deeper" in str(exc) else ""
        raise fail(source, f"refused: {exc}{bound}") from None
