"""Teacher fingerprint: a canonical content hash of what an encoder computes.

The fingerprint is a sha256 over

* a version tag (``mimic-fingerprint-v2``) and the architecture name (``EncoderSpec.name``,
  e.g. ``cifar_resnet18-w16``),
* the input normalisation: the three ``mean`` and three ``std`` values (exact float64 bytes),
* for every tensor of the backbone state dict, in sorted canonical-name order: its name, dtype,
  shape and the raw bytes of the contiguous CPU tensor,

each field length-prefixed (8-byte big-endian length), so no two different inputs share a byte
stream. It is computed on canonical names after loading, so the same weights give the same
fingerprint whether they come as our ``.pt``, our ``.safetensors``, a research (``f.f.*``) or a
torchvision checkpoint, in any key order.

The normalisation is part of it since v2: it is part of the module (``Encoder.forward``
normalises its input), so two files with the same weights but different mean/std compute
different features and must not share cached results. Imported layouts carry no statistics; they
get the caller's (or CIFAR-10's), and that choice is what is fingerprinted. v1 fingerprints
(weights and architecture only) are not comparable with v2 ones.

Deliberately *not* part of it: BatchNorm ``num_batches_tracked`` counters -- they do not change
what the encoder computes in eval mode, and old checkpoints lack them (they load as zeros).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mimic.encoders import Encoder, EncoderSpec

__all__ = ["fingerprint_encoder", "fingerprint_file", "fingerprint_state_dict"]

_TAG = b"mimic-fingerprint-v2"


def _field(h: "hashlib._Hash", data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def fingerprint_state_dict(
    state_dict: Mapping[str, Tensor], arch: str, *, mean: Sequence[float], std: Sequence[float]
) -> str:
    """sha256 hex of ``arch``, the normalisation and every tensor (name, dtype, shape, bytes) in sorted name order."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must hold one value per input channel (3)")
    h = hashlib.sha256()
    _field(h, _TAG)
    _field(h, arch.encode("utf-8"))
    _field(h, struct.pack(">6d", *(float(v) for v in (*mean, *std))))
    names = sorted(k for k in state_dict if not k.endswith("num_batches_tracked"))
    _field(h, str(len(names)).encode())
    for name in names:
        t = state_dict[name]
        _field(h, name.encode("utf-8"))
        _field(h, str(t.dtype).encode())
        _field(h, json.dumps(list(t.shape)).encode())
        _field(h, _tensor_bytes(t))
    return h.hexdigest()


def fingerprint_encoder(encoder: Encoder) -> str:
    """Fingerprint of an :class:`~mimic.encoders.Encoder` (backbone weights, spec name, normalisation)."""
    spec = encoder.spec
    return fingerprint_state_dict(encoder.backbone.state_dict(), spec.name, mean=spec.mean, std=spec.std)


def fingerprint_file(path: str | os.PathLike[str], spec: EncoderSpec | None = None) -> str:
    """Fingerprint of the encoder in a model file (loaded safely by ``load_encoder``)."""
    from mimic.checkpoints import load_encoder

    return fingerprint_encoder(load_encoder(path, spec=spec).encoder)
