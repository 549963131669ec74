"""Writing encoders (mimic's own format) and training checkpoints, atomically (``mimic.io``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mimic.checkpoints.contents import check_plain
from mimic.checkpoints.layouts import FORMAT_NAME, FORMAT_VERSION
from mimic.encoders import Encoder
from mimic.errors import ConfigError
from mimic.io import atomic_write


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
    check_plain(meta, "meta", allow_tensors=False)
    check_plain(extras, "extras", allow_tensors=True)
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
        atomic_write(path, blob)
        return
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "spec": encoder.spec.to_meta(),
        "state_dict": state,
        "meta": meta,
        "extras": extras,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def save_state(path: str | os.PathLike[str], obj: dict) -> None:
    """Atomically ``torch.save`` a training checkpoint (plain data and tensors only).

    Non-plain values (numpy arrays, custom objects) are refused with a ConfigError naming them,
    because :func:`~mimic.checkpoints.load.load_state` could not read them back without executing code.
    """
    if not isinstance(obj, Mapping):
        raise ConfigError(f"a training checkpoint must be a dict, got {type(obj).__name__}")
    check_plain(obj, "state", allow_tensors=True)
    atomic_write(path, lambda fh: torch.save(dict(obj), fh))
