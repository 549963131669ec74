"""Explicit bounds on everything a model file declares or implies, checked before allocation.

A hostile file of a few KB can *declare* gigabytes: a width in its metadata, a tensor shape over a
tiny (stride-0) storage, a safetensors header of deeply nested JSON, a pickle that memoizes
millions of objects, a zip with millions of members. Every such size is compared with a field of
:class:`Limits` before anything proportional to it is allocated, and a refusal names the field
(``limit max_width=256``), so an operator knows which knob to turn.

The defaults admit every encoder mimic supports at full size -- torchvision ResNet-50 (23.5 M
parameters, a 100 MB file; 300 MB with an Adam optimizer state), ResNet-50 with the CIFAR stem,
CIFAR ResNet-18 at width 64 -- with a wide margin (measured: a ResNet-50 + Adam ``torch.save``
has 809 zip members, a 79 KB ``data.pkl`` of 26 k opcodes and 6 k memo entries), while keeping the
memory a refused file can make mimic allocate well under 300 MB above the process baseline
(``benchmarks/bench_hostile.py`` measures it per case).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mimic.errors import ConfigError

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True)
class Limits:
    """Bounds applied while reading a model file (``load_encoder(..., limits=Limits(...))``)."""

    max_file_bytes: int = 2 << 30
    """Largest model file read at all (checked with ``stat`` before reading). Files are read into
    memory once; a ResNet-50 with optimizer state is ~300 MB."""

    max_zip_members: int = 10_000
    """Most records in a PyTorch zip archive, counted from the central directory before Python's
    zipfile builds one object per record. ResNet-50 + Adam: 809."""

    zip_expansion_ratio: float = 2.0
    """The records of a zip may expand to at most ``ratio * file size + zip_expansion_slack``
    bytes (PyTorch stores records uncompressed; this leaves room for an honestly deflated file)."""

    zip_expansion_slack: int = 16 << 20
    """See ``zip_expansion_ratio``."""

    max_pickle_bytes: int = 64 << 20
    """Largest pickle stream (``data.pkl``): it holds structure only, the tensor bytes live in
    separate records. ResNet-50 + Adam: 79 KB."""

    max_pickle_ops: int = 2_000_000
    """Most pickle opcodes scanned. Bounds the objects the unpickler can create (a 2-byte opcode
    pair makes a 64-byte list) and the scan time. ResNet-50 + Adam: 26 k."""

    max_pickle_memo: int = 100_000
    """Most memo entries (MEMOIZE/PUT) in a pickle: each keeps an object alive in the unpickler.
    ResNet-50 + Adam: 6 k."""

    max_nesting_depth: int = 32
    """Deepest nesting of containers in a pickle's result and of JSON in a safetensors header or
    mimic metadata (a deep structure makes recursive code raise RecursionError). Real files: <= 4."""

    max_header_bytes: int = 8 << 20
    """Largest safetensors JSON header (JSON can expand ~20x into Python objects). ResNet-50: 30 KB."""

    max_tensor_elements: int = 1 << 27
    """Most elements in one tensor (its declared shape). The largest ResNet-50 tensor has 2.4 M."""

    max_total_elements: int = 1 << 28
    """Most elements over all tensors of a file, views of a shared storage counted each time.
    ResNet-50 + Adam: 77 M."""

    max_width: int = 128
    """Largest CIFAR ResNet-18 width accepted from a file's metadata or weights (full width is 64).
    Width is the one free size of the supported architectures, so this bounds the encoder built
    before the file's keys are matched to it: 45 M parameters (180 MB) at 128, 11.2 M at 64;
    ResNet-18/50 have fixed sizes (11.7 M / 23.5 M)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = float if f.name == "zip_expansion_ratio" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ConfigError(f"limits.{f.name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            if not value > 0:
                raise ConfigError(f"limits.{f.name} must be positive, got {value!r}")

    def zip_expansion_bound(self, file_bytes: int) -> int:
        """Most bytes the records of a ``file_bytes``-byte zip may expand to."""
        return int(self.zip_expansion_ratio * file_bytes) + self.zip_expansion_slack


DEFAULT_LIMITS = Limits()
