"""Safe loading and saving of model files.

A model file is untrusted input: nothing in it is ever executed, and every size it declares is
bounded before anything proportional to it is allocated (:class:`Limits`). The package, in the
order a file flows through it:

* :mod:`.sniff` -- format from magic bytes (never from the extension); formats refused outright;
* :mod:`.archive` -- PyTorch zip archives: bounded, unambiguous, rebuilt for torch from exactly
  the records that were scanned;
* :mod:`.pickle_scan` -- our allow-list opcode scanner (executes nothing);
* :mod:`.safetensors_header` -- the safetensors header validated completely;
* :mod:`.reader` -- :func:`read_raw`: the above plus ``torch.load(weights_only=True)`` and a
  walk that bounds every loaded tensor by its storage;
* :mod:`.layouts` -- key layouts (mimic, research, torchvision; prefixes, heads, momentum copies)
  to canonical names; :mod:`.arch` -- architecture inference;
* :mod:`.contents` -- normalisation, extras and metadata validation;
* :mod:`.load` / :mod:`.save` -- :func:`load_encoder`, :func:`load_state`, :func:`save_encoder`,
  :func:`save_state`.

Every problem surfaces as a one-line :class:`~mimic.errors.CheckpointError` naming the file.
``docs/security.md`` lists what is refused and why.
"""

from __future__ import annotations

from mimic.checkpoints.arch import infer_spec
from mimic.checkpoints.layouts import FORMAT_NAME, FORMAT_VERSION, canonical_state_dict
from mimic.checkpoints.limits import DEFAULT_LIMITS, Limits
from mimic.checkpoints.load import LoadedEncoder, load_encoder, load_state, read_raw
from mimic.checkpoints.safetensors_header import SafetensorsContent
from mimic.checkpoints.save import save_encoder, save_state

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Limits",
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
