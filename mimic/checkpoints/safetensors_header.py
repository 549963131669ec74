"""Safetensors: the JSON header is validated completely, within limits, before the library sees it.

A lying header makes tensors read other tensors' bytes, overlap, or point outside the file; a
deeply nested one makes Python's JSON parser raise RecursionError; a huge one expands ~20x into
Python objects. Every tensor must be a known dtype with a sane shape whose byte span matches
dtype x shape exactly, and the spans must tile the data section with no gap, overlap or tail.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mimic.checkpoints.limits import Limits
from mimic.checkpoints.messages import fail, names, over_limit, printable

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass(frozen=True)
class SafetensorsContent:
    """What :func:`~mimic.checkpoints.read_raw` returns for a safetensors file: tensors plus the string metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]


def json_too_deep(text: bytes, max_depth: int) -> bool:
    """True if the JSON ``text`` nests arrays/objects deeper than ``max_depth`` (or its brackets do
    not balance). Runs in C-speed passes, without recursion, before any parser sees the text."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):  # each pass removes the innermost level
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            return True  # unbalanced: the parser must not see it either
        brackets = shorter
    return bool(brackets)


def parse_json(text: bytes | str, source: str, what: str, limits: Limits) -> Any:
    """``json.loads`` after the nesting depth has been checked; duplicate object keys are refused."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if json_too_deep(raw, limits.max_nesting_depth):
        raise fail(
            source,
            f"refused: {what} nests deeper than limit max_nesting_depth={limits.max_nesting_depth} "
            "(or its brackets do not balance)",
        )

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            keys = [k for k, _ in pairs]
            raise ValueError(f"duplicate keys {names(sorted({k for k in keys if keys.count(k) > 1}))}")
        return out

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise fail(source, f"refused: {what} is not valid JSON ({printable(str(exc), 120)})") from None


def _check_entry(name: str, entry: Any, data_len: int, source: str, limits: Limits) -> tuple[int, int]:
    label = repr(printable(name))
    if not isinstance(entry, dict):
        raise fail(source, f"refused: safetensors entry {label} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise fail(source, f"refused: safetensors tensor {label} has unknown dtype {printable(repr(dtype), 40)}")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and d >= 0 for d in shape)):
        raise fail(source, f"refused: safetensors tensor {label} has an invalid shape {printable(repr(shape), 60)}")
    if shape and max(shape) > limits.max_tensor_elements:
        raise over_limit(source, f"a dimension of safetensors tensor {label}", max(shape), "max_tensor_elements",
                         limits.max_tensor_elements)  # fmt: skip
    if math.prod(shape) > limits.max_tensor_elements:
        raise over_limit(source, f"elements of safetensors tensor {label}", math.prod(shape), "max_tensor_elements",
                         limits.max_tensor_elements)  # fmt: skip
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise fail(source, f"refused: safetensors tensor {label} has invalid data_offsets {printable(repr(offsets), 60)}")
    begin, end = offsets
    if begin > end or end > data_len:
        raise fail(
            source,
            f"refused: safetensors tensor {label} claims bytes {begin}..{end} "
            f"but the data section has {data_len} bytes (offsets beyond the file)",
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise fail(source, f"refused: safetensors tensor {label} spans {end - begin} bytes, its dtype and shape need {expected}")
    return begin, end


def validate_header(data: bytes, source: str, limits: Limits) -> dict[str, str]:
    """Check a safetensors header completely; return its ``__metadata__`` (strings only)."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise fail(
            source,
            f"refused: safetensors header length {n} is larger than the file ({len(data)} bytes); truncated or lying header",
        )
    if n > limits.max_header_bytes:
        raise over_limit(source, "safetensors header bytes", n, "max_header_bytes", limits.max_header_bytes)
    header = parse_json(data[8 : 8 + n], source, "safetensors header", limits)
    if not isinstance(header, dict):
        raise fail(source, "refused: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise fail(source, "refused: safetensors __metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    spans = sorted((*_check_entry(name, entry, data_len, source, limits), name) for name, entry in header.items())
    cursor, prev = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise fail(source, f"refused: safetensors tensors {printable(str(prev))!r} and {printable(name)!r} overlap")
        if begin > cursor:
            raise fail(source, f"refused: safetensors data has a gap before tensor {printable(name)!r}")
        cursor, prev = end, name
    if cursor != data_len:
        raise fail(source, f"refused: safetensors data section has {data_len - cursor} unaccounted bytes")
    return meta or {}


def read_safetensors(data: bytes, source: str, limits: Limits) -> SafetensorsContent:
    meta = validate_header(data, source, limits)
    try:
        from safetensors.torch import load as st_load

        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - any library failure is a bad file
        raise fail(source, f"cannot read safetensors file: {printable(str(exc), 200)}") from None
    return SafetensorsContent(tensors=dict(tensors), metadata=dict(meta))
