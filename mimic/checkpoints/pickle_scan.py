"""Our own pickle scanner: an explicit allow-list, checked opcode by opcode, executing nothing.

``pickletools.genops`` parses the opcode stream without running it. The scanner keeps a model of
the unpickler's stack (strings, globals, and "something else"), with the MARK metastack and the
memo, so that it knows exactly which module and name every ``GLOBAL``, ``INST`` and
``STACK_GLOBAL`` would import -- also when the name is assembled from memoized strings. A name
that is built at run time (anything but two known strings) is refused, as is every name outside
:data:`ALLOWED_GLOBALS`. The scan is bounded by :class:`~mimic.checkpoints.limits.Limits`
(``max_pickle_ops``, ``max_pickle_memo``) so that neither it nor the unpickler after it can be
made to hold millions of objects.

The allow-list is ours, not PyTorch's private one: plain containers, ``torch.Size``/``device``,
dtypes, storage classes and the tensor rebuild functions that only *view* loaded storages. Torch
rebuilders that allocate from declared sizes or load non-dense tensors are refused by name
(:data:`UNSUPPORTED_REBUILDERS`). ``torch.load(weights_only=True)`` runs after the scan as a second,
independent guard.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickletools
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from mimic.checkpoints.limits import Limits
from mimic.checkpoints.messages import code_refusal, fail, over_limit

ALLOWED_GLOBALS = frozenset({
    "_codecs.encode",  # how protocol 2 pickles bytes
    "builtins.bytearray", "builtins.complex", "builtins.set", "builtins.frozenset",
    "collections.OrderedDict", "collections.Counter",
    "torch.Size", "torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch.storage.TypedStorage", "torch.storage.UntypedStorage",
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._tensor._rebuild_from_type_v2", "torch.serialization._get_layout",
})  # fmt: skip

# Known torch rebuilders that are refused with a clear reason instead of "pickled code".
UNSUPPORTED_REBUILDERS = {
    "torch._utils._rebuild_qtensor": "quantized tensors (the rebuild allocates the declared shape)",
    "torch._utils._rebuild_nested_tensor": "nested tensors",
    "torch._utils._rebuild_wrapper_subclass": "tensor subclasses",
    "torch._utils._rebuild_device_tensor_from_numpy": "numpy-backed tensors",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "device tensors",
}

# Storage/tensor classes (``torch.FloatStorage``) and dtypes (``torch.float32``) that torch's
# unpickler resolves by name; anything deeper in the torch namespace must be listed above
# (``torch.serialization`` + ``os.system`` would otherwise reach ``os.system``).
_TORCH_STORAGE = re.compile(r"^torch\.(?:cuda\.)?[A-Z]\w*(?:Storage|Tensor)$")
_TORCH_DTYPE = re.compile(r"^torch\.([a-z][a-z0-9_]*)$")

_STRING_OPS = frozenset({
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
})  # fmt: skip
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MARK_BUILD_OPS = frozenset({"TUPLE", "LIST", "DICT", "FROZENSET", "OBJ", "INST"})  # pop to mark, push one
_MARK_FILL_OPS = frozenset({"APPENDS", "SETITEMS", "ADDITEMS"})  # pop to mark, the container stays
_NOTHING_OPS = frozenset({"PROTO", "FRAME"})
DYNAMIC_NAME = "<dynamically built name>"


def is_allowed_global(name: str) -> bool:
    if name in ALLOWED_GLOBALS or _TORCH_STORAGE.match(name):
        return True
    dtype = _TORCH_DTYPE.match(name)
    return bool(dtype) and isinstance(getattr(torch, dtype.group(1), None), torch.dtype)


@dataclass(frozen=True)
class _Global:
    name: str


@dataclass
class PickleScan:
    """What one pickle stream would import, and where it ends."""

    end: int  # offset just after the STOP opcode (or where the stream broke off)
    globals: list[str] = field(default_factory=list)  # distinct names, in order of appearance
    first_value: Any = None  # argument of the first opcode (to recognise torch's legacy magic number)
    error: str | None = None  # why the stream ended early (truncated / not a pickle)
    ops: int = 0
    memo: int = 0

    @property
    def bad_globals(self) -> list[str]:
        return [g for g in self.globals if not is_allowed_global(g)]


def _resolve(module: str, name: str, proto: int) -> str:
    """The name pickle's ``find_class`` imports (Python 2 names are mapped below protocol 3)."""
    if proto < 3:
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


class _Broken(Exception):
    """The opcode stream cannot be unpickled (stack underflow, unknown memo key...)."""


def scan_pickle(data: bytes, source: str, limits: Limits, start: int = 0) -> PickleScan:
    """Walk one pickle's opcodes from ``start``; collect every global it would import.

    Raises a CheckpointError when a limit is exceeded (code found so far is reported first);
    a truncated or malformed stream is reported in ``PickleScan.error``.
    """
    with warnings.catch_warnings():  # protocol-0 strings with odd escapes warn: a file must not print
        warnings.simplefilter("ignore")
        return _scan(data, source, limits, start)


def _scan(data: bytes, source: str, limits: Limits, start: int) -> PickleScan:
    stream = io.BytesIO(data)
    stream.seek(start)
    scan = PickleScan(end=start)
    seen: set[str] = set()
    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    proto = 0
    first = True

    def record(name: str) -> None:
        if name not in seen:
            seen.add(name)
            scan.globals.append(name)

    def pop(n: int = 1) -> list[Any]:
        nonlocal stack
        if len(stack) < n:
            raise _Broken("stack underflow")
        out = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return out

    def pop_mark() -> None:
        nonlocal stack
        if not metastack:
            raise _Broken("no MARK on the stack")
        stack = metastack.pop()

    def limit(what: str, value: int, name: str, bound: int) -> Exception:
        bad = scan.bad_globals
        return code_refusal(source, bad) if bad else over_limit(source, what, value, name, bound)

    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            scan.ops += 1
            if scan.ops > limits.max_pickle_ops:
                raise limit("pickle opcodes", scan.ops, "max_pickle_ops", limits.max_pickle_ops)
            op = opcode.name
            if first and op not in _NOTHING_OPS:
                scan.first_value, first = arg, False
            if op == "PROTO":
                proto = int(arg)
            elif op in _NOTHING_OPS:
                pass
            elif op == "MARK":
                metastack.append(stack)
                stack = []
            elif op in _MARK_BUILD_OPS:
                if op == "INST":
                    module, _, attr = str(arg).partition(" ")
                    record(_resolve(module, attr, proto))
                pop_mark()
                stack.append(None)
            elif op in _MARK_FILL_OPS:
                pop_mark()
                if not stack:
                    raise _Broken(f"{op} without a container")
            elif op == "POP_MARK":
                pop_mark()
            elif op in _STRING_OPS:
                stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif op == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                name = _resolve(module, attr, proto)
                record(name)
                stack.append(_Global(name))
            elif op == "STACK_GLOBAL":
                module, attr = pop(2)
                name = _resolve(module, attr, proto) if isinstance(module, str) and isinstance(attr, str) else DYNAMIC_NAME
                record(name)
                stack.append(_Global(name))
            elif op in ("EXT1", "EXT2", "EXT4"):
                record(f"<extension registry code {arg}>")
                stack.append(None)
            elif op in _GET_OPS:
                if arg not in memo:
                    raise _Broken(f"memo key {arg} is read before it is written")
                stack.append(memo[arg])
            elif op in _PUT_OPS or op == "MEMOIZE":
                if not stack:
                    raise _Broken("memoizing an empty stack")
                key = len(memo) if op == "MEMOIZE" else arg
                memo[key] = stack[-1]
                if len(memo) > limits.max_pickle_memo:
                    raise limit("pickle memo entries", len(memo), "max_pickle_memo", limits.max_pickle_memo)
            elif op == "DUP":
                stack.append(pop()[0])
                stack.append(stack[-1])
            elif op == "STOP":
                pop()
                scan.end = stream.tell()
                scan.memo = len(memo)
                return scan
            else:  # every other opcode pops and pushes a fixed number of (opaque) values
                pop(len(opcode.stack_before))
                stack.extend([None] * len(opcode.stack_after))
        scan.error = "the pickle stream ends without a STOP opcode"
    except _Broken as exc:
        scan.error = str(exc)
    except (ValueError, EOFError, struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        scan.error = (str(exc) or type(exc).__name__)[:200]
    scan.end = stream.tell()
    scan.memo = len(memo)
    return scan


def refuse_code(scan: PickleScan, source: str) -> None:
    """Raise if the scan found a global outside the allow-list."""
    bad = scan.bad_globals
    if not bad:
        return
    kinds = {g: _unsupported_kind(g) for g in bad}
    if all(kinds.values()):
        raise fail(source, f"refused: the file holds {', '.join(sorted(set(kinds.values())))}; only dense tensors are loaded")
    raise code_refusal(source, [g for g, kind in kinds.items() if not kind])


def _unsupported_kind(name: str) -> str | None:
    """What a torch global outside the allow-list rebuilds, when it is a known tensor kind."""
    if name in UNSUPPORTED_REBUILDERS:
        return UNSUPPORTED_REBUILDERS[name]
    attr = _TORCH_DTYPE.match(name)  # torch.per_tensor_affine & co: quantization schemes
    if attr and isinstance(getattr(torch, attr.group(1), None), torch.qscheme):
        return UNSUPPORTED_REBUILDERS["torch._utils._rebuild_qtensor"]
    return None
