"""Stage identities: every stage's inputs declared once, one content key per stage.

A stage's key is a hash of everything that can change what it computes:

* ``inputs`` -- content identities of what it reads (teacher fingerprint, the clean set's content
  hash, the MI weights it was given, ...), supplied by the caller;
* ``params`` -- the values of the config paths the stage declares (and only those: editing a param
  re-runs only the stages that read it);
* ``code`` -- a hash of the source of the stage's entry modules and every ``mimic`` module they
  import, transitively (editing one stage's code invalidates that stage, and the stages after it
  through their inputs, not every stage), plus a per-stage ``version`` for changes outside the code;
* ``runtime`` -- the device type and the autocast precision actually used (a bf16 or GPU student is
  never reused for an fp32/CPU request). The thread count is not part of it: results at different
  thread counts are equally valid but not bit-identical; it is recorded with the results.

The *resume lineage* of a training stage is the same key without the params that only extend a
run (``distill.epochs``): a longer run resumes from the checkpoint of a shorter one.

The Prefect cache key (``tasks.stages.StageKeyPolicy``), the on-disk layout ``ROOT/<stage>/<key>/``
(:mod:`mimic.cache`), the resume lineage and the code dependencies of ``dvc.yaml`` all come from
:data:`STAGES` below.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mimic.config import Config, ScanConfig

PACKAGE_ROOT = Path(__file__).resolve().parent

# Modules that do not decide what a stage computes: configuration plumbing, file formats whose
# content is identified by fingerprints and content hashes, orchestration glue, the front ends.
NEUTRAL_MODULES = frozenset({
    "mimic", "mimic.audit", "mimic.cache", "mimic.config", "mimic.errors", "mimic.fingerprint", "mimic.identity",
    "mimic.inputs", "mimic.io", "mimic.results", "mimic.stages", "mimic.stages.common",
})
NEUTRAL_PACKAGES = ("mimic.checkpoints", "mimic.store", "mimic.cli")


# every scan.* param but the threshold, which only judges a finished scan (mimic.scan.scan_verdict)
SCAN_SEARCH_PARAMS = tuple(f.name for f in dataclasses.fields(ScanConfig) if f.name != "threshold")


@dataclass(frozen=True)
class StageDef:
    """What a stage reads: its code (entry modules), its params, and which params only extend it."""

    name: str
    entry: tuple[str, ...]  # modules whose code, with the mimic modules they import, decides the result
    params: tuple[str, ...]  # config paths the stage reads ("seed", "mi", "distill.lr", ...)
    resume_free: tuple[str, ...] = ()  # params left out of the resume lineage (training can be extended)
    extendable: Callable[[Config], bool] | None = None  # None: always; else whether this config's run can be extended
    version: int = 1  # bump to invalidate cached results when something outside the code changes them


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in (
        StageDef("pretrain", ("mimic.stages.pretrain",), ("seed", "encoder", "pretrain"), ("pretrain.epochs",)),
        StageDef("attack", ("mimic.stages.attack",), ("seed", "attack"), ("attack.epochs",)),
        StageDef("drupe", ("mimic.stages.drupe",), ("seed", "attack", "drupe"), ("attack.epochs",)),
        StageDef("adaptive", ("mimic.stages.adaptive",), ("seed", "attack", "adaptive"), ("attack.epochs",)),
        StageDef("scan", ("mimic.stages.scan",), ("seed",) + tuple(f"scan.{k}" for k in SCAN_SEARCH_PARAMS)),
        StageDef("mi", ("mimic.stages.mi",), ("seed", "mi")),
        StageDef("distill", ("mimic.stages.distill",), ("seed", "distill"), ("distill.epochs",),
                 # an attention schedule spans the run: a longer run differs from its first epoch
                 extendable=lambda cfg: cfg.distill.attention_end == 1.0),
        StageDef("evaluate", ("mimic.stages.evaluate",), ("seed", "evaluate")),
        StageDef("unlearn", ("mimic.stages.unlearn",), ("seed", "unlearn"), ("unlearn.epochs",)),
        StageDef("prune", ("mimic.stages.prune",), ("seed", "prune"), ("prune.epochs",)),
    )
}


# ---------------------------------------------------------------------------------------------
# code identity


def _module_file(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:]) if module != "mimic" else Path()
    for cand in (PACKAGE_ROOT / rel.with_suffix(".py"), PACKAGE_ROOT / rel / "__init__.py"):
        if rel != Path() and cand.is_file():
            return cand
    return None


def _neutral(module: str) -> bool:
    return module in NEUTRAL_MODULES or any(module == p or module.startswith(p + ".") for p in NEUTRAL_PACKAGES)


def _imports(path: Path) -> set[str]:
    """``mimic.*`` modules imported anywhere in ``path`` (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "mimic")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "mimic":
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}"))
    return out


@lru_cache(maxsize=None)
def code_modules(stage: str) -> tuple[str, ...]:
    """The non-neutral ``mimic`` modules a stage's result depends on (its entry modules and their imports)."""
    todo, seen = list(STAGES[stage].entry), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod)
        if path is not None:
            todo.extend(m for m in _imports(path) if not _neutral(m))
    return tuple(sorted(m for m in seen if _module_file(m) is not None and not _neutral(m)))


def code_files(stage: str) -> tuple[str, ...]:
    """The source files of :func:`code_modules`, relative to the repository root (``dvc.yaml`` deps)."""
    root = PACKAGE_ROOT.parent
    return tuple(sorted(str(_module_file(m).relative_to(root)) for m in code_modules(stage)))  # type: ignore[union-attr]


@lru_cache(maxsize=None)
def code_hash(stage: str) -> str:
    h = hashlib.sha256(f"{stage}:v{STAGES[stage].version}".encode())
    for mod in code_modules(stage):
        h.update(mod.encode())
        h.update(_module_file(mod).read_bytes())  # type: ignore[union-attr]
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# params and runtime identity


def _plain(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def param_values(stage: str, cfg: Config, *, lineage: bool = False) -> dict[str, Any]:
    """``{dotted.param: value}`` of what ``stage`` reads (without its resume-free params for a lineage)."""
    d = STAGES[stage]
    out: dict[str, Any] = {}
    for path in d.params:
        node: Any = cfg
        for part in path.split("."):
            node = getattr(node, part)
        out.update(_leaves(path, _plain(node)))
    if lineage and (d.extendable is None or d.extendable(cfg)):
        out = {k: v for k, v in out.items() if not any(k == f or k.startswith(f + ".") for f in d.resume_free)}
    return out


def runtime_identity(cfg: Config) -> dict[str, str]:
    """Device type and autocast precision as they will actually be used (``auto`` resolved)."""
    from mimic.runtime import autocast_dtype, resolve_device

    device = resolve_device(cfg.device)
    amp = autocast_dtype(device, cfg.precision)
    return {"device": device.type, "precision": "fp32" if amp is None else str(amp).replace("torch.", "")}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def stage_identity(stage: str, cfg: Config, inputs: Mapping[str, Any], *, lineage: bool = False) -> dict[str, Any]:
    """Everything the key of ``stage`` hashes, as plain data (recorded in the stage's manifest)."""
    return {
        "stage": stage,
        "code": code_hash(stage),
        "params": param_values(stage, cfg, lineage=lineage),
        "inputs": dict(inputs),
        "runtime": runtime_identity(cfg),
    }


def stage_key(stage: str, cfg: Config, inputs: Mapping[str, Any]) -> str:
    """The content key of one run of ``stage``."""
    return _digest(stage_identity(stage, cfg, inputs))


def lineage_key(stage: str, cfg: Config, inputs: Mapping[str, Any]) -> str:
    """The resume lineage: :func:`stage_key` without the stage's resume-free params."""
    return _digest(["lineage", stage_identity(stage, cfg, inputs, lineage=True)])


def audit_key(teacher_fingerprint: str, keys: Mapping[str, str], gate: Any) -> str:
    """Identity of a whole audit: the keys of its stages plus the gate (MLflow/registry idempotency)."""
    return _digest(["audit", teacher_fingerprint, dict(keys), _plain(gate)])
