"""Safe loading and saving of model files.

A model file is untrusted input: nothing in it is ever executed. Files are read once into memory,
their format is sniffed from magic bytes (never from the extension), pickles are scanned opcode by
opcode (``pickletools``, which executes nothing) for references to Python callables, and the
actual load goes through ``torch.load(weights_only=True, map_location="cpu")`` -- PyTorch's
restricted unpickler -- or through ``safetensors`` after the header has been validated here.
Every problem surfaces as a one-line :class:`~mimic.errors.CheckpointError` naming the file.

Supported key layouts (all mapped to *canonical* names, the keys of ``Encoder.backbone.state_dict()``):

* ``mimic`` -- our own format, see :func:`save_encoder`.
* ``research`` -- BadEncoder / MIMIC SimCLR checkpoints: ``{'state_dict': {'f.f.0.weight': ...}}``
  where ``f.f.{0,1,3,4,5,6}`` are conv1, bn1, layer1..layer4; the projection head ``g.*`` is
  ignored (and reported).
* ``torchvision`` -- plain torchvision-style state dicts (``conv1.weight``, ``bn1.*``,
  ``layer1.*`` ...); the classifier ``fc.*`` is ignored (and reported).

A ``module.`` (DataParallel) prefix is stripped, and any layout may be stored as safetensors
(the layout name then gets ``+safetensors``). BatchNorm ``num_batches_tracked`` counters that a
file lacks are filled with zeros: they do not change what an encoder computes in eval mode.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import math
import os
import pickletools
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from mimic.encoders import CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderSpec
from mimic.errors import CheckpointError, ConfigError

FORMAT_NAME = "mimic-encoder"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedEncoder",
    "SafetensorsContent",
    "canonical_state_dict",
    "infer_spec",
    "load_encoder",
    "load_state",
    "read_raw",
    "save_encoder",
    "save_state",
]

# Magic numbers used to sniff a file's format.
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy (non-zip) format
_MAX_PICKLE_BYTES = 1 << 30  # refuse a data.pkl that claims to be larger than this (zip bomb)
_MAX_FILE_BYTES = 2 << 30  # files are read into memory; resnet50 in fp32 is ~100 MB
_ZIP_SLACK = 16 << 20  # a zip may expand to at most 2x its size + this (torch stores records uncompressed)
_MAX_ST_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library

_ST_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

_STRING_OPS = {
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8",
}  # fmt: skip
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH_OPS = {"MEMOIZE", "FRAME", "PROTO", "MARK", "STOP"} | _PUT_OPS


# ----------------------------------------------------------------------------------------------
# errors


def _fail(source: str, message: str) -> CheckpointError:
    """A one-line CheckpointError ``"<source>: <message>"`` (newlines collapsed)."""
    text = f"{source}: {message}"
    return CheckpointError(" ".join(text.split()))


def _names(keys: Any, limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _code_refusal(source: str, bad: list[str]) -> CheckpointError:
    return _fail(
        source,
        f"refused: the file contains pickled code (global {_names(sorted(set(bad)), 3)}); "
        "only tensors and plain data are loaded",
    )


# ----------------------------------------------------------------------------------------------
# pickle scanning (executes nothing)


def _allowed_globals() -> set[str]:
    """Globals PyTorch's weights-only unpickler accepts (plus anything registered as safe)."""
    allowed: set[str] = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}
    try:  # private API: the scan is advisory, torch's unpickler is the real guard
        from torch import _weights_only_unpickler as wou

        allowed.update(wou._get_allowed_globals().keys())
    except Exception:  # pragma: no cover - depends on the torch version
        pass
    try:
        for obj in torch.serialization.get_safe_globals():
            if isinstance(obj, tuple):
                obj = obj[0]
            allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    except Exception:  # pragma: no cover
        pass
    return allowed


# Torch storage/tensor classes and dtypes (``torch.FloatStorage``, ``torch.float32``) that torch's
# own unpickler resolves dynamically; anything deeper in the torch namespace must be allowlisted
# (``torch.serialization`` + ``os.system`` would otherwise reach ``os.system``).
_TORCH_STORAGE = re.compile(r"^torch\.(?:cuda\.)?[A-Z]\w*(?:Storage|Tensor)$")
_TORCH_DTYPE = re.compile(r"^torch\.([a-z][a-z0-9_]*)$")


def _is_allowed_global(name: str, allowed: set[str]) -> bool:
    if name in allowed or _TORCH_STORAGE.match(name):
        return True
    dtype = _TORCH_DTYPE.match(name)
    return bool(dtype) and isinstance(getattr(torch, dtype.group(1), None), torch.dtype)


@dataclass
class _PickleScan:
    end: int  # offset just after the STOP opcode
    globals: list[str] = field(default_factory=list)
    first_value: Any = None  # value of the first push (to recognise torch's legacy magic number)
    error: str | None = None  # why the opcode stream ended early (truncated / not a pickle)


def _scan_pickle(data: bytes, start: int = 0) -> _PickleScan:
    """Walk one pickle's opcodes from ``start``; collect every global it would import."""
    stream = io.BytesIO(data)
    stream.seek(start)
    scan = _PickleScan(end=start)
    recent: list[Any] = []  # values pushed by recent opcodes (strings tracked, others None)
    memo: dict[Any, Any] = {}
    first = True
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if first and name not in ("PROTO", "FRAME"):
                scan.first_value = arg
                first = False
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                scan.globals.append(_py3_name(module, attr))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                if isinstance(module, str) and isinstance(attr, str):
                    scan.globals.append(_py3_name(module, attr))
                else:
                    scan.globals.append("<dynamically built name>")
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name in _GET_OPS:
                recent.append(memo.get(arg))
            elif name in _PUT_OPS:
                memo[arg] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name not in _NO_PUSH_OPS:
                recent.append(None)
            if len(recent) > 64:
                del recent[:32]
            if name == "STOP":
                scan.end = stream.tell()
                return scan
        scan.error = "the pickle stream ends without a STOP opcode"
    except (ValueError, EOFError, struct.error, IndexError, UnicodeDecodeError) as exc:
        scan.error = str(exc) or type(exc).__name__
    scan.end = stream.tell()
    return scan


def _py3_name(module: str, name: str) -> str:
    """The name pickle's ``fix_imports`` resolves a (possibly Python 2) global to."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _bad_globals(globs: list[str]) -> list[str]:
    if not globs:
        return []
    allowed = _allowed_globals()
    return [g for g in globs if not _is_allowed_global(g, allowed)]


# ----------------------------------------------------------------------------------------------
# format sniffing and raw reading


@dataclass(frozen=True)
class SafetensorsContent:
    """What :func:`read_raw` returns for a safetensors file: tensors plus the string metadata."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # a bad byte that is not just a character cut at the end
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 9 or data[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 0 < n < (1 << 32)


def _is_tar(data: bytes) -> bool:
    return len(data) >= 262 and data[257:262] == b"ustar"


def _sniff(data: bytes) -> str:
    if data.startswith(_ZIP_MAGIC) or data.startswith(_EMPTY_ZIP_MAGIC):
        return "zip"
    if _is_safetensors(data):
        return "safetensors"
    if data.startswith(_NPY_MAGIC):
        return "npy"
    if _is_tar(data):
        return "tar"
    if data.startswith(_GZIP_MAGIC):
        return "gzip"
    if data[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _torch_load(data: bytes, source: str) -> object:
    """``torch.load`` with the restricted unpickler; every failure becomes a CheckpointError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any library failure is a bad file
        msg = str(exc)
        hit = re.search(r"GLOBAL ([\w.<>]+)", msg)
        if hit:
            raise _code_refusal(source, [hit.group(1)]) from None
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            reasons = [ln for ln in lines[1:] if not ln.startswith("Check the documentation")]
            reason = reasons[0] if reasons else "unsupported content"
            raise _fail(source, f"refused by PyTorch's weights-only loader: {reason[:200]}") from None
        first = lines[0] if lines else type(exc).__name__
        raise _fail(source, f"cannot read PyTorch checkpoint (corrupt or truncated file?): {first[:200]}") from None


def _read_zip(data: bytes, source: str) -> object:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _fail(source, f"truncated or corrupt zip archive ({exc})") from None
    expanded = sum(info.file_size for info in archive.infolist())
    if expanded > 2 * len(data) + _ZIP_SLACK:
        raise _fail(
            source,
            f"refused: the zip records expand to {expanded} bytes from a {len(data)}-byte file "
            "(a zip bomb? PyTorch stores checkpoint records uncompressed)",
        )
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        if any(n.endswith(".npy") for n in names):
            raise _fail(source, "a numpy .npz archive, not a model checkpoint")
        raise _fail(source, "a zip archive without data.pkl: not a PyTorch checkpoint")
    if len(pickles) > 1:
        raise _fail(source, f"refused: zip archive holds {len(pickles)} data.pkl records")
    prefix = pickles[0][: -len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in names) or (prefix + "constants.pkl") in names:
        raise _fail(
            source,
            "refused: a TorchScript archive (it contains code); save and load a state_dict instead",
        )
    try:
        info = archive.getinfo(pickles[0])
        if info.file_size > _MAX_PICKLE_BYTES:
            raise _fail(source, f"refused: data.pkl claims {info.file_size} bytes")
        pkl = archive.read(pickles[0])
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - zlib/CRC/EOF errors of a damaged archive
        raise _fail(source, f"truncated or corrupt zip archive ({exc})") from None
    scan = _scan_pickle(pkl)
    bad = _bad_globals(scan.globals)
    if bad:
        raise _code_refusal(source, bad)
    if scan.error:
        raise _fail(source, f"corrupt data.pkl in zip archive ({scan.error})")
    return _torch_load(data, source)


def _read_pickle_stream(data: bytes, source: str) -> object:
    """A protocol-2+ pickle: torch's legacy (non-zip) format, or a plain Python pickle."""
    first = _scan_pickle(data)
    legacy = first.error is None and first.first_value == _TORCH_LEGACY_MAGIC
    if not legacy:
        bad = _bad_globals(first.globals)
        if bad:
            raise _code_refusal(source, bad)
        if first.error:
            raise _fail(source, f"truncated or corrupt pickle ({first.error})")
        raise _fail(
            source,
            "a plain Python pickle, not a PyTorch checkpoint; re-save it with torch.save or safetensors",
        )
    # Legacy torch layout: magic, protocol version, sys info, the object, storage keys, raw data.
    pos, globs = first.end, []
    for _ in range(4):
        scan = _scan_pickle(data, pos)
        globs += scan.globals
        bad = _bad_globals(globs)
        if bad:
            raise _code_refusal(source, bad)
        if scan.error:
            raise _fail(source, f"truncated or corrupt legacy PyTorch file ({scan.error})")
        pos = scan.end
    return _torch_load(data, source)


def _read_other(data: bytes, source: str) -> object:
    """No magic number matched: a protocol 0/1 pickle, text, or something else entirely."""
    scan = _scan_pickle(data)
    bad = _bad_globals(scan.globals)
    if bad:
        raise _code_refusal(source, bad)
    if scan.error is None and scan.end >= len(data) - 1:
        raise _fail(
            source,
            "a plain Python pickle, not a PyTorch checkpoint; re-save it with torch.save or safetensors",
        )
    head = data[:512]
    if _looks_like_text(head):
        first_line = head.decode("utf-8", errors="replace").strip().splitlines()[0][:40] if head.strip() else ""
        raise _fail(source, f"a text file, not a model checkpoint (starts with {first_line!r})")
    raise _fail(
        source,
        "unrecognised file format (not a PyTorch zip or legacy checkpoint, not safetensors); "
        "the file may be truncated or corrupt",
    )


def _read_npy(data: bytes, source: str) -> object:
    try:
        major = data[6]
        if major == 1:
            (hlen,) = struct.unpack("<H", data[8:10])
            header = data[10 : 10 + hlen].decode("latin-1")
        else:
            (hlen,) = struct.unpack("<I", data[8:12])
            header = data[12 : 12 + hlen].decode("utf-8")
    except (IndexError, struct.error, UnicodeDecodeError):
        header = ""
    if re.search(r"'descr':\s*'\|?O'", header):
        raise _fail(
            source,
            "refused: a numpy object array (it holds pickled Python objects); "
            "only tensors and plain data are loaded",
        )
    raise _fail(source, "a numpy .npy array file, not a model checkpoint")


def _validate_safetensors(data: bytes, source: str) -> dict[str, Any]:
    """Check a safetensors header completely before the library sees the file."""
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _fail(
            source,
            f"refused: safetensors header length {n} is larger than the file ({len(data)} bytes); "
            "truncated or lying header",
        )
    if n > _MAX_ST_HEADER:
        raise _fail(source, f"refused: safetensors header of {n} bytes exceeds {_MAX_ST_HEADER}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate keys {_names(dup)}")
        return dict(pairs)

    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(source, f"refused: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(source, "refused: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise _fail(source, "refused: safetensors __metadata__ must map strings to strings")
    data_len = len(data) - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(source, f"refused: safetensors entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise _fail(source, f"refused: safetensors tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _fail(source, f"refused: safetensors tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
        ):
            raise _fail(source, f"refused: safetensors tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin > end or end > data_len:
            raise _fail(
                source,
                f"refused: safetensors tensor {name!r} claims bytes {begin}..{end} "
                f"but the data section has {data_len} bytes (offsets beyond the file)",
            )
        expected = math.prod(shape) * _ST_DTYPES[dtype]
        if end - begin != expected:
            raise _fail(
                source,
                f"refused: safetensors tensor {name!r} spans {end - begin} bytes, "
                f"its dtype and shape need {expected}",
            )
        spans.append((begin, end, name))
    spans.sort()
    cursor, prev = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise _fail(source, f"refused: safetensors tensors {prev!r} and {name!r} overlap")
        if begin > cursor:
            raise _fail(source, f"refused: safetensors data has a gap before tensor {name!r}")
        cursor, prev = end, name
    if cursor != data_len:
        raise _fail(source, f"refused: safetensors data section has {data_len - cursor} unaccounted bytes")
    return meta or {}


def _read_safetensors(data: bytes, source: str) -> SafetensorsContent:
    meta = _validate_safetensors(data, source)
    try:
        from safetensors.torch import load as st_load

        tensors = st_load(data)
    except Exception as exc:  # noqa: BLE001 - any library failure is a bad file
        raise _fail(source, f"cannot read safetensors file: {str(exc)[:200]}") from None
    return SafetensorsContent(tensors=dict(tensors), metadata=dict(meta))


def read_raw(path: str | os.PathLike[str]) -> object:
    """Read any supported model file without executing code from it.

    Returns the unpickled object (plain containers and tensors only) for PyTorch files and a
    :class:`SafetensorsContent` for safetensors files. Raises CheckpointError otherwise.
    """
    source = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise _fail(source, "no such file")
    if p.is_dir():
        raise _fail(source, "is a directory, not a model file")
    try:
        if not p.is_file():  # a FIFO or device would block or never end
            raise _fail(source, "not a regular file (a pipe, socket or device?)")
        size = p.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise _fail(source, f"refused: {size} bytes is larger than the {_MAX_FILE_BYTES}-byte limit for model files")
        data = p.read_bytes()
    except OSError as exc:
        raise _fail(source, f"cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise _fail(source, "empty file (0 bytes)")
    kind = _sniff(data)
    if kind == "zip":
        return _read_zip(data, source)
    if kind == "safetensors":
        return _read_safetensors(data, source)
    if kind == "npy":
        return _read_npy(data, source)
    if kind == "tar":
        names = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError, EOFError):
            pass
        what = "the legacy PyTorch tar format" if "pickle" in names else "a tar archive"
        raise _fail(
            source,
            f"refused: {what} cannot be loaded without executing pickled code; "
            "re-save the weights with a current PyTorch (torch.save of a state_dict) or safetensors",
        )
    if kind == "gzip":
        raise _fail(source, "a gzip-compressed file; decompress it first")
    if kind == "pickle":
        return _read_pickle_stream(data, source)
    return _read_other(data, source)


# ----------------------------------------------------------------------------------------------
# layouts


def _strip_prefix(keys: list[str], prefix: str) -> bool:
    return bool(keys) and all(k.startswith(prefix) for k in keys)


_RESEARCH_INDEX = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
_RESEARCH_RE = re.compile(r"^f\.(?:f\.)?(\d+)\.(.+)$")


def _tensor_dict(obj: Mapping, source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise _fail(source, f"unknown layout: state dict has a non-string key {k!r}")
        if not isinstance(v, Tensor):
            raise _fail(source, f"unknown layout: entry {k!r} holds {type(v).__name__}, not a tensor")
        out[k] = v
    return out


def _is_tensor_mapping(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _mimic_payload(raw: object, source: str) -> tuple[dict[str, Tensor], dict, dict, dict] | None:
    """(state_dict, spec_meta, meta, extras) when ``raw`` is our own format, else None."""
    if isinstance(raw, SafetensorsContent):
        md = raw.metadata
        if md.get("format") != FORMAT_NAME:
            return None
        try:
            spec_meta = json.loads(md["spec"])
            meta = json.loads(md.get("meta", "{}"))
        except (KeyError, ValueError) as exc:
            raise _fail(source, f"bad mimic-encoder metadata ({exc})") from None
        if not isinstance(spec_meta, dict) or not isinstance(meta, dict):
            raise _fail(source, "bad mimic-encoder metadata (spec and meta must be JSON objects)")
        return dict(raw.tensors), spec_meta, meta, {}
    if not (isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME):
        return None
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise _fail(source, f"unsupported mimic-encoder version {version!r} (this mimic reads {FORMAT_VERSION})")
    spec_meta, sd = raw.get("spec"), raw.get("state_dict")
    meta, extras = raw.get("meta", {}) or {}, raw.get("extras", {}) or {}
    if not isinstance(spec_meta, Mapping) or not isinstance(sd, Mapping):
        raise _fail(source, "bad mimic-encoder file: 'spec' and 'state_dict' must be dicts")
    if not isinstance(meta, Mapping) or not isinstance(extras, Mapping):
        raise _fail(source, "bad mimic-encoder file: 'meta' and 'extras' must be dicts")
    return _tensor_dict(sd, source), dict(spec_meta), dict(meta), dict(extras)


def _unwrap(raw: object, source: str) -> dict[str, Tensor]:
    if isinstance(raw, SafetensorsContent):
        return dict(raw.tensors)
    if not isinstance(raw, Mapping):
        raise _fail(source, f"unknown layout: the file holds a {type(raw).__name__}, not a dict of tensors")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and inner:
            return _tensor_dict(inner, source)
    if _is_tensor_mapping(raw):
        return _tensor_dict(raw, source)
    keys = [str(k) for k in raw.keys()]
    raise _fail(
        source,
        f"unknown layout: expected a state dict of tensors or {{'state_dict': ...}}; top-level keys: "
        f"{_names(keys) or '(none)'}",
    )


def _canonical_with_origin(
    raw: object, source: str
) -> tuple[dict[str, Tensor], str, dict | None, tuple[str, ...], dict[str, str]]:
    """canonical_state_dict plus a map canonical name -> name in the file (for messages)."""
    suffix = "+safetensors" if isinstance(raw, SafetensorsContent) else ""
    payload = _mimic_payload(raw, source)
    if payload is not None:
        sd, spec_meta, _meta, _extras = payload
        return sd, "mimic" + suffix, spec_meta, (), {k: k for k in sd}

    sd = _unwrap(raw, source)
    items = list(sd.items())
    while _strip_prefix([k for k, _ in items], "module."):
        items = [(k[len("module."):], v) for k, v in items]
    items = [(k[len("module."):] if k.startswith("module.") else k, v) for k, v in items]
    for prefix in ("backbone.", "encoder."):
        if _strip_prefix([k for k, _ in items if not k.startswith(("g.", "fc."))], prefix):
            items = [(k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in items]

    original = {k: k for k, _ in items}
    research = any(_RESEARCH_RE.match(k) for k, _ in items)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in items:
        if key.startswith(("g.", "fc.")):
            ignored.append(key)
            continue
        name = key
        if research:
            hit = _RESEARCH_RE.match(key)
            if hit and hit.group(1) in _RESEARCH_INDEX:
                name = f"{_RESEARCH_INDEX[hit.group(1)]}.{hit.group(2)}"
        if name in out:
            raise _fail(source, f"unknown layout: keys {origin[name]!r} and {key!r} both map to {name!r}")
        out[name] = value
        origin[name] = original[key]
    layout = ("research" if research else "torchvision") + suffix
    return out, layout, None, tuple(sorted(ignored)), origin


def canonical_state_dict(raw: object, source: str) -> tuple[dict[str, Tensor], str, dict | None, tuple[str, ...]]:
    """Map a raw file object to canonical backbone names.

    Returns ``(state_dict, layout, spec_meta_or_None, ignored_keys)``; ``spec_meta`` is only
    present for our own format. Keys that do not belong to the backbone are kept (they are
    reported as unexpected when loading), except the heads ``g.*`` and ``fc.*`` (ignored).
    """
    sd, layout, spec_meta, ignored, _ = _canonical_with_origin(raw, source)
    return sd, layout, spec_meta, ignored


# ----------------------------------------------------------------------------------------------
# architecture inference

_SUPPORTED = "cifar_resnet18, resnet18, resnet50"
_KNOWN_RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def _describe_net(state_dict: Mapping[str, Tensor]) -> tuple[str, tuple[int, ...], str | None]:
    """(block kind, blocks per stage, known torchvision name or None) from key names."""
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state_dict if (m := re.match(rf"^layer{stage}\.(\d+)\.", k))}
        counts.append(max(idx) + 1 if idx else 0)
    kind = "bottleneck" if any(re.match(r"^layer\d\.\d+\.conv3\.", k) for k in state_dict) else "basic"
    return kind, tuple(counts), _KNOWN_RESNETS.get((kind, tuple(counts)))


def _infer(state_dict: Mapping[str, Tensor]) -> EncoderSpec:
    """infer_spec raising ValueError (message without a file name)."""
    w = state_dict.get("conv1.weight")
    if not isinstance(w, Tensor):
        keys = sorted(state_dict)
        raise ValueError(f"unknown layout: no conv1.weight (keys: {_names(keys) or 'none'})")
    shape = tuple(w.shape)
    kind, counts, known = _describe_net(state_dict)
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"unsupported architecture: conv1.weight has shape {list(shape)}, expected [C, 3, k, k]")
    if shape[2:] == (3, 3):
        if kind != "basic" or any(c > 2 for c in counts):
            name = known or f"{kind}-block ResNet with {'-'.join(map(str, counts))} blocks"
            raise ValueError(f"unsupported architecture: a CIFAR-style {name}; supported: {_SUPPORTED}")
        return EncoderSpec(arch="cifar_resnet18", width=int(shape[0]))
    if shape[2:] == (7, 7):
        if shape[0] != 64:
            raise ValueError(f"unsupported architecture: 7x7 conv1 with {shape[0]} channels (resnet18/50 use 64)")
        arch = "resnet50" if kind == "bottleneck" else "resnet18"
        limit = (3, 4, 6, 3) if arch == "resnet50" else (2, 2, 2, 2)
        if any(c > m for c, m in zip(counts, limit)):
            name = known or f"{kind}-block ResNet with {'-'.join(map(str, counts))} blocks"
            raise ValueError(f"unsupported architecture: {name}; supported: {_SUPPORTED}")
        return EncoderSpec(arch=arch)
    raise ValueError(f"unsupported architecture: conv1 kernel {shape[2]}x{shape[3]}")


def infer_spec(state_dict: Mapping[str, Tensor]) -> EncoderSpec:
    """Architecture and width from canonical key names and shapes (CIFAR-10 normalisation)."""
    try:
        return _infer(state_dict)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder loaded from a file, with where it came from."""

    encoder: Encoder  # in eval mode, on CPU
    spec: EncoderSpec
    layout: str  # "mimic", "research", "torchvision", plus "+safetensors" when applicable
    meta: dict  # plain metadata from our format ({} otherwise)
    extras: dict  # extras from our format ({} otherwise)
    ignored: tuple[str, ...]  # keys deliberately dropped (g.*, fc.*)


def _label(name: str, origin: Mapping[str, str]) -> str:
    return name if origin.get(name, name) == name else f"{name} ({origin[name]} in the file)"


def _check_tensor_kinds(sd: Mapping[str, Tensor], origin: Mapping[str, str], source: str) -> None:
    """Only dense CPU tensors with data: sparse, quantized, meta or nested tensors are refused."""
    for name, t in sd.items():
        if t.is_meta or t.device.type != "cpu":
            what = "a meta tensor (it holds no data)" if t.is_meta else f"on device {t.device}"
            raise _fail(source, f"tensor {_label(name, origin)} is {what}; only dense tensors with data are loaded")
        if getattr(t, "is_nested", False) or t.layout != torch.strided:
            kind = "nested" if getattr(t, "is_nested", False) else str(t.layout).replace("torch.", "")
            raise _fail(source, f"tensor {_label(name, origin)} has layout {kind}; only dense tensors are loaded")
        if t.is_quantized:
            raise _fail(source, f"tensor {_label(name, origin)} is quantized ({t.dtype}); only float weights are loaded")


def _check_dtypes(
    sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], origin: Mapping[str, str], source: str
) -> None:
    """A float parameter must come from a real float tensor (no ints, bools or complex numbers)."""
    for k, ref in expected.items():
        got = sd[k]
        if got.is_complex() or (ref.is_floating_point() and not got.is_floating_point()):
            raise _fail(
                source,
                f"dtype mismatch for {_label(k, origin)}: file has {str(got.dtype).replace('torch.', '')}, "
                f"expected a floating-point tensor",
            )


def _check_finite(sd: Mapping[str, Tensor], origin: Mapping[str, str], source: str) -> None:
    for name, t in sd.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if s)
                label = name if origin.get(name, name) == name else f"{name} ({origin[name]} in the file)"
                raise _fail(source, f"non-finite weights: tensor {label} has {what} values")


def _match_keys(
    sd: dict[str, Tensor], expected: Mapping[str, Tensor], origin: Mapping[str, str], source: str, spec: EncoderSpec
) -> dict[str, Tensor]:
    missing = [k for k in expected if k not in sd]
    filled = dict(sd)
    for k in list(missing):
        if k.endswith("num_batches_tracked"):
            filled[k] = torch.zeros_like(expected[k])
            missing.remove(k)
    unexpected = [origin.get(k, k) for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_names(unexpected)}")
        raise _fail(source, f"keys do not match {spec.name}: " + "; ".join(parts))
    for k, ref in expected.items():
        got = filled[k]
        if tuple(got.shape) != tuple(ref.shape):
            label = k if origin.get(k, k) == k else f"{k} ({origin[k]} in the file)"
            raise _fail(
                source,
                f"shape mismatch for {label}: file has {list(got.shape)}, {spec.name} expects {list(ref.shape)}",
            )
    return filled


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be three numbers, got {values!r}") from None
    if len(out) != 3:
        raise ConfigError(f"{what} must be three numbers, got {values!r}")
    return out  # type: ignore[return-value]


def load_encoder(
    path: str | os.PathLike[str],
    spec: EncoderSpec | None = None,
    mean: Any = None,
    std: Any = None,
) -> LoadedEncoder:
    """Load an encoder from any supported file, strictly, without executing code from it.

    ``spec`` (optional) is what the caller expects: a file holding another architecture or width
    is refused. Normalisation: explicit ``mean``/``std`` win; otherwise our own files use their
    stored statistics, imported layouts use ``spec``'s if given, else CIFAR-10's.
    """
    source = os.fspath(path)
    raw = read_raw(path)
    sd, layout, spec_meta, ignored, origin = _canonical_with_origin(raw, source)
    _check_tensor_kinds(sd, origin, source)
    payload = _mimic_payload(raw, source)
    meta, extras = (payload[2], payload[3]) if payload is not None else ({}, {})

    inferred: EncoderSpec | None
    inferred_err: str | None = None
    try:
        inferred = _infer(sd)
    except ValueError as exc:
        inferred, inferred_err = None, str(exc)

    file_spec: EncoderSpec | None = None
    if spec_meta is not None:
        try:
            file_spec = EncoderSpec.from_meta(spec_meta)
            _triple(file_spec.mean, "mean")
            _triple(file_spec.std, "std")
            if not all(math.isfinite(v) and v > 0 for v in file_spec.std):
                raise ConfigError(f"std must be positive, got {list(file_spec.std)}")
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise _fail(source, f"bad encoder spec in file metadata ({exc})") from None
        if inferred is not None and (inferred.arch, inferred.width) != (file_spec.arch, file_spec.width):
            raise _fail(source, f"inconsistent file: metadata says {file_spec.name}, weights are {inferred.name}")
    elif inferred is not None:
        file_spec = inferred

    if file_spec is None:
        if spec is None or (inferred_err or "").startswith("unsupported"):
            raise _fail(source, inferred_err or "unknown layout")
        file_spec = spec  # cannot infer (e.g. conv1 missing): check keys against the caller's spec
    if spec is not None and (spec.arch, spec.width) != (file_spec.arch, file_spec.width):
        raise _fail(source, f"wrong architecture: file holds {file_spec.name}, expected {spec.name}")

    if mean is not None:
        m = _triple(mean, "mean")
    elif spec_meta is not None:
        m = file_spec.mean
    else:
        m = spec.mean if spec is not None else CIFAR10_MEAN
    if std is not None:
        s = _triple(std, "std")
    elif spec_meta is not None:
        s = file_spec.std
    else:
        s = spec.std if spec is not None else CIFAR10_STD
    final = EncoderSpec(arch=file_spec.arch, width=file_spec.width, mean=m, std=s)

    encoder = Encoder(final)
    expected = encoder.backbone.state_dict()
    sd = _match_keys(sd, expected, origin, source, final)
    _check_dtypes(sd, expected, origin, source)
    _check_finite(sd, origin, source)
    try:
        encoder.backbone.load_state_dict(sd, strict=True)
    except Exception as exc:  # noqa: BLE001 - should not happen after the checks above
        raise _fail(source, f"cannot load weights into {final.name}: {str(exc)[:200]}") from None
    encoder.eval()
    return LoadedEncoder(encoder=encoder, spec=final, layout=layout, meta=meta, extras=extras, ignored=ignored)


# ----------------------------------------------------------------------------------------------
# saving

_PLAIN_SCALARS = (str, int, float, bool, type(None), bytes, bytearray, complex)


def _check_plain(obj: Any, where: str, allow_tensors: bool) -> None:
    """Raise ConfigError unless ``obj`` is made of plain containers, scalars (and tensors)."""
    if isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(obj, Tensor):
        if allow_tensors:
            return
        raise ConfigError(f"{where} is a tensor; put tensors in extras, not meta")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ConfigError(f"{where} has a non-string key {k!r}")
            _check_plain(v, f"{where}.{k}", allow_tensors)
        return
    if isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", allow_tensors)
        return
    raise ConfigError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, not plain data "
        "(use str/int/float/bool/None, lists, dicts or tensors)"
    )


def _atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write via ``write(fileobj)`` to a temp file in the target dir, fsync, then os.replace."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_encoder(
    path: str | os.PathLike[str],
    encoder: Encoder,
    meta: dict | None = None,
    extras: dict | None = None,
) -> None:
    """Save ``encoder`` in our format, atomically.

    ``.safetensors`` paths get a safetensors file whose ``__metadata__`` holds ``format``,
    ``spec`` and ``meta`` (JSON); extras are not supported there. Any other suffix gets a torch
    file ``{"format", "version", "spec", "state_dict", "meta", "extras"}``.
    """
    meta = dict(meta or {})
    extras = dict(extras or {})
    _check_plain(meta, "meta", allow_tensors=False)
    _check_plain(extras, "extras", allow_tensors=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.backbone.state_dict().items()}
    if Path(path).suffix.lower() == ".safetensors":
        if extras:
            raise ConfigError("extras cannot be stored in a .safetensors file; save as .pt instead")
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"meta must be JSON-serialisable for .safetensors ({exc})") from None
        from safetensors.torch import save as st_save

        blob = st_save(
            state,
            metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION),
                      "spec": json.dumps(encoder.spec.to_meta()), "meta": meta_json},
        )  # fmt: skip
        _atomic_write(path, lambda fh: fh.write(blob))
        return
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "spec": encoder.spec.to_meta(),
        "state_dict": state,
        "meta": meta,
        "extras": extras,
    }
    _atomic_write(path, lambda fh: torch.save(payload, fh))


def save_state(path: str | os.PathLike[str], obj: dict) -> None:
    """Atomically ``torch.save`` a training checkpoint (plain data and tensors only).

    Non-plain values (numpy arrays, custom objects) are refused with a ConfigError naming them,
    because :func:`load_state` could not read them back without executing code.
    """
    if not isinstance(obj, Mapping):
        raise ConfigError(f"a training checkpoint must be a dict, got {type(obj).__name__}")
    _check_plain(obj, "state", allow_tensors=True)
    _atomic_write(path, lambda fh: torch.save(dict(obj), fh))


def load_state(path: str | os.PathLike[str]) -> dict:
    """Load a training checkpoint written by :func:`save_state` (weights-only, CPU)."""
    raw = read_raw(path)
    if isinstance(raw, SafetensorsContent) or not isinstance(raw, dict):
        raise _fail(os.fspath(path), f"not a training checkpoint (holds {type(raw).__name__}, expected a dict)")
    return raw
