"""``load_encoder`` / ``load_state``: strict loading, every size bounded before anything is built.

Order of work for ``load_encoder`` (each step refuses with one line naming the file):

1. ``read_raw``: file, format, scan, load, and the walk that bounds every loaded tensor;
2. map the keys to canonical names; validate mimic's metadata, normalisation and extras;
3. infer the architecture from shapes; check the width against ``max_width`` -- the one free size
   of the supported architectures, so this bounds the encoder that is built next -- and the
   metadata against the weights;
4. build the encoder (the one allocation proportional to its size; at most a CIFAR ResNet-18 of
   ``max_width``: 45 M parameters at 128) and match every key, shape, dtype and value of the
   file to it before loading.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from mimic.checkpoints.arch import infer
from mimic.checkpoints.contents import check_normalisation, check_plain, normalisation, validate_extras
from mimic.checkpoints.layouts import imported_layout, mimic_payload
from mimic.checkpoints.limits import DEFAULT_LIMITS, Limits
from mimic.checkpoints.messages import fail, over_limit, printable
from mimic.checkpoints.reader import read_raw as _read_raw
from mimic.checkpoints.reader import read_raw_hashed
from mimic.checkpoints.safetensors_header import SafetensorsContent
from mimic.encoders import ARCHITECTURES, CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderSpec
from mimic.errors import ConfigError, MimicError

F = TypeVar("F", bound=Callable[..., Any])
UNEXPECTED = "unexpected error while reading the file"


def boundary(func: F) -> F:
    """Whatever a model file makes the loader raise becomes a one-line CheckpointError for that file.

    Anything that is not already a MimicError is a bug in mimic (the fuzz tests assert this
    message never appears), but it must still not escape as a traceback.
    """

    @functools.wraps(func)
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(path, *args, **kwargs)
        except MimicError:
            raise
        except Exception as exc:  # noqa: BLE001 - the exception boundary of one model file
            detail = printable(f"{type(exc).__name__}: {exc}", 160)
            raise fail(str(path), f"{UNEXPECTED} ({detail}); please report this as a mimic bug") from None

    return wrapper  # type: ignore[return-value]


read_raw = boundary(_read_raw)


@dataclass(frozen=True)
class LoadedEncoder:
    """An encoder loaded from a file, with where it came from."""

    encoder: Encoder  # in eval mode, on CPU
    spec: EncoderSpec
    layout: str  # "mimic", "research", "torchvision", plus "+safetensors" when applicable
    meta: dict  # plain metadata from our format ({} otherwise)
    extras: dict  # extras from our format, validated ({} otherwise)
    ignored: tuple[str, ...]  # keys deliberately dropped (heads, momentum copies, queues)
    sha256: str  # of the bytes this was loaded from (read once: what was loaded is what was hashed)


def _label(name: str, origin: Mapping[str, str]) -> str:
    return printable(name) if origin.get(name, name) == name else f"{printable(name)} ({printable(origin[name])} in the file)"


def _check_tensor_kinds(sd: Mapping[str, Tensor], origin: Mapping[str, str], source: str) -> None:
    """Only dense CPU tensors with data: sparse, quantized, meta or nested tensors are refused."""
    for name, t in sd.items():
        if t.is_meta or t.device.type != "cpu":
            what = "a meta tensor (it holds no data)" if t.is_meta else f"on device {t.device}"
            raise fail(source, f"tensor {_label(name, origin)} is {what}; only dense tensors with data are loaded")
        if getattr(t, "is_nested", False) or t.layout != torch.strided:
            kind = "nested" if getattr(t, "is_nested", False) else str(t.layout).replace("torch.", "")
            raise fail(source, f"tensor {_label(name, origin)} has layout {kind}; only dense tensors are loaded")
        if t.is_quantized:
            raise fail(source, f"tensor {_label(name, origin)} is quantized ({t.dtype}); only float weights are loaded")


def _match_keys(
    sd: dict[str, Tensor], expected: Mapping[str, Tensor], origin: Mapping[str, str], source: str, spec: EncoderSpec
) -> dict[str, Tensor]:
    missing = [k for k in expected if k not in sd]
    filled = dict(sd)
    for k in list(missing):
        if k.endswith("num_batches_tracked"):  # old files lack the counters; they change nothing in eval mode
            filled[k] = torch.zeros(expected[k].shape, dtype=expected[k].dtype)
            missing.remove(k)
    unexpected = [origin.get(k, k) for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            shown = ", ".join(printable(k) for k in unexpected[:5])
            parts.append(f"unexpected {len(unexpected)} key(s): {shown}{' ...' if len(unexpected) > 5 else ''}")
        raise fail(source, f"keys do not match {spec.name}: " + "; ".join(parts))
    for k, ref in expected.items():
        got = filled[k]
        if tuple(got.shape) != tuple(ref.shape):
            raise fail(
                source,
                f"shape mismatch for {_label(k, origin)}: file has {list(got.shape)[:8]}, {spec.name} expects {list(ref.shape)}",
            )
    return filled


def _check_values(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], origin: Mapping[str, str], source: str) -> None:
    """Float parameters come from real float tensors (no ints, bools, complex) and are finite."""
    for k, ref in expected.items():
        got = sd[k]
        if got.is_complex() or (ref.is_floating_point() and not got.is_floating_point()):
            raise fail(
                source,
                f"dtype mismatch for {_label(k, origin)}: file has {str(got.dtype).replace('torch.', '')}, "
                "expected a floating-point tensor",
            )
    for name, t in sd.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if s)
            raise fail(source, f"non-finite weights: tensor {_label(name, origin)} has {what} values")


def _spec_from_meta(spec_meta: Mapping[str, Any], source: str, limits: Limits) -> EncoderSpec:
    """The encoder spec stored in our format, every field type- and range-checked."""
    try:
        arch, width = spec_meta.get("arch"), spec_meta.get("width", 64)
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {printable(repr(arch), 40)}; choose one of {', '.join(ARCHITECTURES)}")
        if isinstance(width, bool) or not isinstance(width, int):
            raise ValueError(f"width must be an integer, got {type(width).__name__}")
        if width > limits.max_width:
            raise over_limit(source, "encoder width in the file's metadata", width, "max_width", limits.max_width)
        mean = normalisation(spec_meta.get("mean", CIFAR10_MEAN), "mean")
        std = normalisation(spec_meta.get("std", CIFAR10_STD), "std")
        return EncoderSpec(arch=arch, width=width, mean=mean, std=std)
    except (ConfigError, ValueError) as exc:
        raise fail(source, f"bad encoder spec in file metadata ({exc})") from None


def _file_contents(raw: object, source: str, limits: Limits):
    """(state dict, layout, spec from metadata or None, meta, extras, ignored, origin)."""
    payload = mimic_payload(raw, source, limits)
    if payload is None:
        sd, layout, ignored, origin = imported_layout(raw, source)
        return sd, layout, None, {}, {}, ignored, origin
    sd, spec_meta, meta, extras = payload
    try:
        check_plain(meta, "meta", allow_tensors=False, max_depth=limits.max_nesting_depth)
    except ConfigError as exc:
        raise fail(source, f"bad metadata: {exc}") from None
    try:
        extras = validate_extras(extras)
    except ValueError as exc:
        raise fail(source, f"bad extras: {exc}") from None
    layout = "mimic+safetensors" if isinstance(raw, SafetensorsContent) else "mimic"
    return sd, layout, _spec_from_meta(spec_meta, source, limits), meta, extras, (), {k: k for k in sd}


@boundary
def load_encoder(
    path: str | os.PathLike[str],
    spec: EncoderSpec | None = None,
    mean: Any = None,
    std: Any = None,
    limits: Limits | None = None,
) -> LoadedEncoder:
    """Load an encoder from any supported file, strictly, without executing code from it.

    ``spec`` (optional) is what the caller expects: a file holding another architecture or width
    is refused. Normalisation: explicit ``mean``/``std`` win; otherwise our own files use their
    stored statistics, imported layouts use ``spec``'s if given, else CIFAR-10's. ``limits``
    bounds everything the file declares (:class:`~mimic.checkpoints.limits.Limits`).
    """
    limits = limits or DEFAULT_LIMITS
    source = os.fspath(path)
    raw, sha256 = read_raw_hashed(path, limits)
    sd, layout, file_spec, meta, extras, ignored, origin = _file_contents(raw, source, limits)
    _check_tensor_kinds(sd, origin, source)

    inferred: EncoderSpec | None
    inferred_err: str | None = None
    try:
        inferred = infer(sd)
    except (ValueError, ConfigError) as exc:
        inferred, inferred_err = None, str(exc)
    if inferred is not None and inferred.width > limits.max_width:
        raise over_limit(source, "encoder width (conv1 output channels)", inferred.width, "max_width", limits.max_width)
    if file_spec is not None and inferred is not None and (inferred.arch, inferred.width) != (file_spec.arch, file_spec.width):
        raise fail(source, f"inconsistent file: metadata says {file_spec.name}, weights are {inferred.name}")
    from_metadata = file_spec is not None
    file_spec = file_spec or inferred
    if file_spec is None:
        if spec is None or (inferred_err or "").startswith("unsupported"):
            raise fail(source, inferred_err or "unknown layout")
        file_spec = spec  # cannot infer (e.g. conv1 missing): check keys against the caller's spec
    if spec is not None and (spec.arch, spec.width) != (file_spec.arch, file_spec.width):
        raise fail(source, f"wrong architecture: file holds {file_spec.name}, expected {spec.name}")

    fallback = file_spec if from_metadata else (spec or EncoderSpec())
    m, s = check_normalisation(fallback.mean if mean is None else mean, fallback.std if std is None else std)
    final = EncoderSpec(arch=file_spec.arch, width=file_spec.width, mean=m, std=s)
    if final.width > limits.max_width:
        raise over_limit(source, "encoder width", final.width, "max_width", limits.max_width)

    encoder = Encoder(final)
    expected = encoder.backbone.state_dict()
    sd = _match_keys(sd, expected, origin, source, final)
    _check_values(sd, expected, origin, source)
    try:
        encoder.backbone.load_state_dict(sd, strict=True)
    except Exception as exc:  # noqa: BLE001 - should not happen after the checks above
        raise fail(source, f"cannot load weights into {final.name}: {printable(str(exc), 200)}") from None
    encoder.eval()
    return LoadedEncoder(encoder=encoder, spec=final, layout=layout, meta=meta, extras=extras, ignored=ignored,
                         sha256=sha256)


@boundary
def load_state(path: str | os.PathLike[str], limits: Limits | None = None) -> dict:
    """Load a training checkpoint written by :func:`~mimic.checkpoints.save.save_state` (weights-only, CPU)."""
    raw = _read_raw(path, limits or DEFAULT_LIMITS)
    if isinstance(raw, SafetensorsContent) or not isinstance(raw, dict):
        raise fail(os.fspath(path), f"not a training checkpoint (holds {type(raw).__name__}, expected a dict)")
    return raw
