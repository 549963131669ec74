"""Key layouts -> canonical names (the keys of ``Encoder.backbone.state_dict()``), by name only.

* ``mimic`` -- our own format, see :func:`~mimic.checkpoints.save.save_encoder`.
* ``research`` -- BadEncoder / DRUPE / MIMIC SimCLR checkpoints: ``f.f.{0,1,3,4,5,6}`` (or
  ``f.{...}``) are conv1, bn1, layer1..layer4; the projection head ``g.*`` is ignored.
* ``torchvision`` -- ``conv1.weight``, ``bn1.*``, ``layer1.*`` ...; the classifier ``fc.*`` is ignored.

The state dict may sit under ``state_dict``, ``model_state_dict`` or ``model`` next to anything
else (``epoch``, ``optimizer``, ... are never looked at), and its keys may carry ``module.``
(DataParallel) and any wrapper prefix: the backbone is found where a stem is (``P + conv1.weight``,
or ``P + f.f.0.weight``), so ``encoder_q.``, ``model.``, ``visual.``, ``backbone.``, ``encoder.``
and combinations such as ``module.encoder_q.`` all work. Heads (``fc``, ``g``, ``projector``,
``predictor``) next to or inside the backbone, momentum copies (``encoder_k``,
``momentum_encoder``, ...) and MoCo's ``queue``/``queue_ptr`` are dropped and reported in
``ignored``. Two candidate backbones (or only a momentum copy) are refused with the candidates
listed. Any other key is kept, so that loading reports it as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mimic.checkpoints.limits import DEFAULT_LIMITS, Limits
from mimic.checkpoints.messages import fail, names, printable
from mimic.checkpoints.safetensors_header import SafetensorsContent, parse_json

FORMAT_NAME = "mimic-encoder"
FORMAT_VERSION = 1

HEADS = frozenset({"fc", "g", "projector", "predictor"})
MOMENTUM = frozenset({"encoder_k", "key_encoder", "momentum_encoder", "target_encoder", "target_network", "momentum_backbone"})
QUEUES = frozenset({"queue", "queue_ptr"})
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")

_RESEARCH_INDEX = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2", "5": "layer3", "6": "layer4"}
_RESEARCH_RE = re.compile(r"^f\.(?:f\.)?(\d+)\.(.+)$")
_RESEARCH_STEM = re.compile(r"^((?:[^.]+\.)*?)f\.(?:f\.)?0\.weight$")
_INNER = re.compile(r"(?:^|\.)(?:layer\d+|\d+)\.")  # a block or Sequential index: not a backbone root


def tensor_dict(obj: Mapping, source: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise fail(source, f"unknown layout: state dict has a non-string key {printable(repr(k), 40)}")
        if not isinstance(v, Tensor):
            raise fail(source, f"unknown layout: entry {printable(k)!r} holds {type(v).__name__}, not a tensor")
        out[k] = v
    return out


def mimic_payload(raw: object, source: str, limits: Limits) -> tuple[dict[str, Tensor], dict, dict, dict] | None:
    """(state_dict, spec_meta, meta, extras) when ``raw`` is our own format, else None."""
    if isinstance(raw, SafetensorsContent):
        md = raw.metadata
        if md.get("format") != FORMAT_NAME:
            return None
        if "spec" not in md:
            raise fail(source, "bad mimic-encoder metadata (no 'spec')")
        spec_meta = parse_json(md["spec"], source, "mimic-encoder spec metadata", limits)
        meta = parse_json(md.get("meta", "{}"), source, "mimic-encoder meta", limits)
        if not isinstance(spec_meta, dict) or not isinstance(meta, dict):
            raise fail(source, "bad mimic-encoder metadata (spec and meta must be JSON objects)")
        return dict(raw.tensors), spec_meta, meta, {}
    if not (isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME):
        return None
    version = raw.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise fail(source, f"unsupported mimic-encoder version {printable(repr(version), 40)} (this mimic reads {FORMAT_VERSION})")
    spec_meta, sd = raw.get("spec"), raw.get("state_dict")
    meta, extras = raw.get("meta", {}) or {}, raw.get("extras", {}) or {}
    if not isinstance(spec_meta, Mapping) or not isinstance(sd, Mapping):
        raise fail(source, "bad mimic-encoder file: 'spec' and 'state_dict' must be dicts")
    if not isinstance(meta, Mapping) or not isinstance(extras, Mapping):
        raise fail(source, "bad mimic-encoder file: 'meta' and 'extras' must be dicts")
    return tensor_dict(sd, source), dict(spec_meta), dict(meta), dict(extras)


def _unwrap(raw: object, source: str) -> dict[str, Tensor]:
    if isinstance(raw, SafetensorsContent):
        return dict(raw.tensors)
    if not isinstance(raw, Mapping):
        raise fail(source, f"unknown layout: the file holds a {type(raw).__name__}, not a dict of tensors")
    found = [k for k in CONTAINER_KEYS if isinstance(raw.get(k), Mapping) and raw.get(k)]
    if len(found) > 1:
        raise fail(source, f"refused: ambiguous layout: several state dicts ({names(found)}); keep one")
    if found:
        return tensor_dict(raw[found[0]], source)
    if raw and all(isinstance(v, Tensor) for v in raw.values()):
        return tensor_dict(raw, source)
    keys = [str(k) for k in raw.keys()]
    raise fail(
        source,
        f"unknown layout: expected a state dict of tensors or {{'state_dict': ...}}; top-level keys: {names(keys) or '(none)'}",
    )


def _candidates(keys: list[str]) -> dict[str, str]:
    """Backbone roots: prefix -> "torchvision" (``P + conv1.weight``) or "research" (``P + f.f.0.weight``)."""
    roots: dict[str, str] = {}
    for key in keys:
        if key.endswith("conv1.weight"):
            prefix = key[: -len("conv1.weight")]
            if (not prefix or prefix.endswith(".")) and not _INNER.search(prefix):
                roots.setdefault(prefix, "torchvision")
        hit = _RESEARCH_STEM.match(key)
        if hit and not _INNER.search(hit.group(1)):
            roots[hit.group(1)] = "research"
    return roots


def _label(prefix: str) -> str:
    return prefix or "(top level)"


def _choose(roots: dict[str, str], source: str) -> tuple[str, str]:
    """(prefix, kind) of the backbone to load."""
    if not roots:
        return "", "torchvision"
    main = [p for p in roots if not MOMENTUM & set(p.split(".")[:-1])]
    if len(main) == 1:
        return main[0], roots[main[0]]
    listed = names(sorted(_label(p) for p in roots), 8)
    if not main:
        raise fail(source, f"refused: ambiguous layout: only momentum copies of a backbone ({listed}); no way to choose")
    raise fail(source, f"refused: ambiguous layout: {len(main)} candidate backbones ({listed}); no way to choose")


def _is_dropped(key: str, prefix: str) -> bool:
    """A momentum copy, or a head or queue inside the chosen backbone or next to it (in any wrapper)."""
    if MOMENTUM & set(key.split(".")[:-1]):
        return True
    parts = prefix.split(".")[:-1]
    for depth in range(len(parts), -1, -1):  # the backbone itself, then each wrapper around it
        ancestor = "".join(p + "." for p in parts[:depth])
        if key.startswith(ancestor) and key[len(ancestor) :].split(".", 1)[0] in HEADS | QUEUES:
            return True
    return False


def imported_layout(raw: object, source: str) -> tuple[dict[str, Tensor], str, tuple[str, ...], dict[str, str]]:
    """(canonical state dict, layout, ignored keys, canonical name -> name in the file) of a file
    that is not in mimic's own format."""
    suffix = "+safetensors" if isinstance(raw, SafetensorsContent) else ""
    items = list(_unwrap(raw, source).items())
    while items and all(k.startswith("module.") for k, _ in items):
        items = [(k[len("module.") :], v) for k, v in items]
    items = [(k[len("module.") :] if k.startswith("module.") else k, v) for k, v in items]
    prefix, kind = _choose(_candidates([k for k, _ in items]), source)

    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in items:
        if _is_dropped(key, prefix):
            ignored.append(key)
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if kind == "research" and key.startswith(prefix):
            hit = _RESEARCH_RE.match(name)
            if hit and hit.group(1) in _RESEARCH_INDEX:
                name = f"{_RESEARCH_INDEX[hit.group(1)]}.{hit.group(2)}"
        if name in out:
            raise fail(
                source, f"unknown layout: keys {printable(origin[name])!r} and {printable(key)!r} both map to {printable(name)!r}"
            )
        out[name] = value
        origin[name] = key
    return out, kind + suffix, tuple(sorted(ignored)), origin


def canonical_state_dict(
    raw: object, source: str, limits: Limits | None = None
) -> tuple[dict[str, Tensor], str, dict | None, tuple[str, ...]]:
    """Map a raw file object to canonical backbone names.

    Returns ``(state_dict, layout, spec_meta_or_None, ignored_keys)``; ``spec_meta`` is only
    present for our own format. Keys that do not belong to the backbone are kept (they are
    reported as unexpected when loading), except heads, momentum copies and queues (ignored).
    """
    payload = mimic_payload(raw, source, limits or DEFAULT_LIMITS)
    if payload is not None:
        suffix = "+safetensors" if isinstance(raw, SafetensorsContent) else ""
        return payload[0], "mimic" + suffix, payload[1], ()
    sd, layout, ignored, _origin = imported_layout(raw, source)
    return sd, layout, None, ignored

