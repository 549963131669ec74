"""Frozen, validated configuration: package defaults <- the user's ``params.yaml`` <- profile <- ``--set``.

The defaults ship with the package (``mimic/defaults.yaml``, package data that nothing edits); the
repository's ``params.yaml`` is the user's copy that DVC reads and ``dvc exp run -S`` edits. A
run's configuration is built once, validated, and never mutated afterwards; ``Config.to_dict()``
is what gets logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from mimic.attacks.config import AdaptiveConfig, DrupeConfig
from mimic.checkpoints.limits import Limits
from mimic.defenses.config import PruneConfig, UnlearnConfig
from mimic.errors import ConfigError
from mimic.errors import check_config as _check
from mimic.scan_config import ScanConfig


@dataclass(frozen=True)
class DataConfig:
    source: str
    synthetic_train: int
    synthetic_test: int
    clean_size: int

    def __post_init__(self) -> None:
        _check(self.synthetic_train >= 10 and self.synthetic_test >= 10, "data.synthetic_* must be >= 10")
        _check(self.clean_size >= 2, "data.clean_size must be >= 2")


@dataclass(frozen=True)
class EncoderConfig:
    arch: str
    width: int


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    crop_min_scale: float
    train_size: int


@dataclass(frozen=True)
class AttackConfig:
    target_class: int
    n_reference: int
    trigger_size: int
    trigger_margin: int
    trigger_position: str   # bottom_right | bottom_left | top_right | top_left | centre | random | full
    trigger_pattern: str    # white | colour | noise
    trigger_colour: str     # the colour of pattern 'colour' (mimic.triggers.COLOURS)
    trigger_alpha: float    # mask value inside the trigger (1 = patch; < 1 with position 'full' = blended)
    shadow_size: int
    epochs: int
    batch_size: int
    lr: float
    lambda_reference: float
    lambda_clean: float

    def __post_init__(self) -> None:
        _check(self.n_reference >= 1, "attack.n_reference must be >= 1")
        _check(1 <= self.trigger_size <= 32, "attack.trigger_size must be in 1..32")
        from mimic.triggers import COLOURS, PATTERNS, POSITIONS

        _check(self.trigger_position in POSITIONS, f"attack.trigger_position must be one of {', '.join(POSITIONS)}")
        _check(self.trigger_pattern in PATTERNS, f"attack.trigger_pattern must be one of {', '.join(PATTERNS)}")
        _check(self.trigger_colour in COLOURS, f"attack.trigger_colour must be one of {', '.join(COLOURS)}")
        _check(0 < self.trigger_alpha <= 1, "attack.trigger_alpha must be in (0, 1]")


@dataclass(frozen=True)
class MIConfig:
    estimator: str
    network: str
    epochs: int
    batch_size: int
    lr: float
    hidden: int
    pool: int
    base: float
    scale: float
    mapping: str            # share (the paper: I_l / sum I) | softmax (softmax of I_l / temperature: sharper)
    temperature: float      # nats; the softmax mapping's temperature

    def __post_init__(self) -> None:
        _check(self.estimator in ("dv", "infonce"), f"mi.estimator must be dv or infonce, got {self.estimator!r}")
        _check(self.network in ("teacher", "student"), f"mi.network must be teacher or student, got {self.network!r}")
        _check(self.pool >= 1, "mi.pool must be >= 1")
        _check(self.mapping in ("share", "softmax"), f"mi.mapping must be share or softmax, got {self.mapping!r}")
        _check(self.temperature > 0, "mi.temperature must be > 0")


@dataclass(frozen=True)
class DistillConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    temperature: float
    crop_min_scale: float
    lambda_clone: float
    attention_p: int
    attention_end: float  # beta_l's multiplier at the last epoch, cosine from 1 (mimic.distill.attention_factor); 1 = constant
    contrastive: bool
    attention: bool
    clone: bool
    weights: str
    student_init: str
    memory_format: str  # auto | channels_last | contiguous (mimic.runtime.use_channels_last)
    compile: bool  # torch.compile the student and teacher (docs/performance.md: when it pays)
    nproc: int  # DDP ranks (mimic.distributed); 1 = this process

    def __post_init__(self) -> None:
        _check(self.memory_format in ("auto", "channels_last", "contiguous"),
               f"distill.memory_format must be auto, channels_last or contiguous, got {self.memory_format!r}")
        _check(self.nproc >= 1, f"distill.nproc must be >= 1, got {self.nproc}")
        _check(self.weights in ("mi", "uniform"), f"distill.weights must be mi or uniform, got {self.weights!r}")
        _check(self.student_init in ("empty", "teacher"), "distill.student_init must be empty or teacher")
        _check(self.contrastive or self.attention or self.clone, "distill: at least one loss term must be on")
        _check(self.temperature > 0, "distill.temperature must be > 0")
        _check(0.0 <= self.attention_end, f"distill.attention_end must be >= 0, got {self.attention_end}")


@dataclass(frozen=True)
class EvaluateConfig:
    probe: str              # linear | mlp | both, on the raw L2-normalised features (the standard protocol)
    zscore: bool            # also the same probes on z-scored features (an extra protocol; verdicts take the worst case)
    epochs: int
    batch_size: int
    lr: float
    train_size: int

    def __post_init__(self) -> None:
        _check(self.probe in ("linear", "mlp", "both"), f"evaluate.probe must be linear, mlp or both, got {self.probe!r}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher of the DVC pipeline's ``teacher`` stage."""

    source: str             # demo (SimCLR clean encoder + BadEncoder, from the pretrain/attack params) | PATH | s3://URI

    def __post_init__(self) -> None:
        _check(bool(self.source.strip()), "teacher.source must be 'demo', a path or an s3:// URI")


@dataclass(frozen=True)
class GateConfig:
    """The registry gate: a sanitized student gets the ``alias`` only when it passes."""

    max_asr: float          # student ASR (%) must be <= this
    max_ca_drop: float      # teacher CA - student CA (points) must be <= this
    require_asr: bool       # refuse when ASR could not be measured (no trigger known)
    reject_suspicious_student: bool  # refuse a student that still scans suspicious (PL1 < scan.threshold)
    model_name: str         # registered model name: a template with {teacher} (file stem) and {fingerprint} (12 hex)
    alias: str              # alias moved to a version that passes the gate
    experiment: str         # MLflow experiment of the audit runs

    def __post_init__(self) -> None:
        _check(0 <= self.max_asr <= 100, "gate.max_asr must be a percentage in 0..100")
        _check(self.max_ca_drop >= 0, "gate.max_ca_drop must be >= 0")
        _check(bool(self.model_name.strip()) and bool(self.alias.strip()), "gate.model_name and gate.alias must be non-empty")
        try:
            self.model_name.format(teacher="t", fingerprint="f")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"gate.model_name {self.model_name!r}: the only placeholders are {{teacher}} and "
                              "{fingerprint}") from None


@dataclass(frozen=True)
class TimeoutsConfig:
    """Bounds in seconds (0 = none), so a hung process never blocks the audits queued after it."""

    lock: float  # waiting for another process working on the same stage and key
    stage: float  # one stage run (scan, MI, distillation, evaluation, ...): a Prefect task, or in-process (mimic.audit)
    transfer: float  # a flow step that moves a model or data: fetch, admit, DVC add/push, store (tasks.common)
    service: float  # a flow step that talks to MLflow or the Prefect API: probe, run, register, artifacts
    claim: float  # lease of a watch claim: not refreshed for this long, another watcher takes it over (flows/ledger.py)

    def __post_init__(self) -> None:
        _check(all(getattr(self, f.name) >= 0 for f in fields(self)), "timeouts.* must be >= 0 seconds (0 = no limit)")


@dataclass(frozen=True)
class Config:
    seed: int
    device: str
    precision: str
    data: DataConfig
    encoder: EncoderConfig
    pretrain: PretrainConfig
    attack: AttackConfig
    drupe: DrupeConfig
    adaptive: AdaptiveConfig
    scan: ScanConfig
    mi: MIConfig
    distill: DistillConfig
    evaluate: EvaluateConfig
    unlearn: UnlearnConfig
    prune: PruneConfig
    teacher: TeacherConfig
    gate: GateConfig
    timeouts: TimeoutsConfig
    limits: Limits
    profile: str | None = field(default=None)

    def __post_init__(self) -> None:
        _check(self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        for stage in (self.pretrain, self.attack, self.mi, self.distill, self.evaluate, self.unlearn, self.prune):
            for name in ("epochs", "batch_size"):
                _check(getattr(stage, name) >= 1, f"{type(stage).__name__}.{name} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        """Stable hash of some sections (e.g. ``"distill"``): a cache key for one stage's params."""
        blob = json.dumps({n: _as_plain(getattr(self, n)) for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _as_plain(v: Any) -> Any:
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v


_SECTIONS = {
    "data": DataConfig,
    "encoder": EncoderConfig,
    "pretrain": PretrainConfig,
    "attack": AttackConfig,
    "drupe": DrupeConfig,
    "adaptive": AdaptiveConfig,
    "scan": ScanConfig,
    "mi": MIConfig,
    "distill": DistillConfig,
    "evaluate": EvaluateConfig,
    "unlearn": UnlearnConfig,
    "prune": PruneConfig,
    "teacher": TeacherConfig,
    "gate": GateConfig,
    "timeouts": TimeoutsConfig,
    "limits": Limits,
}
_TOP = ("seed", "device", "precision")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from ``Config.to_dict()`` (e.g. a logged config, a task parameter)."""
    plain = {k: v for k, v in values.items() if k != "profile"}
    cfg = load_config(extra=plain)
    return dataclasses.replace(cfg, profile=values.get("profile"))


def default_params_text() -> str:
    """The package defaults (``mimic/defaults.yaml``): every knob, with the named profiles."""
    return resources.files("mimic").joinpath("defaults.yaml").read_text()


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise ConfigError(f"unknown parameter {where}{key}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"parameter {where}{key} is a group; set {where}{key}.<name>=value")
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def _coerce(cls: type, values: dict, where: str) -> Any:
    """Build dataclass ``cls`` from plain values, converting each to its annotated type."""
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            raise ConfigError(f"missing parameter {where}.{f.name}")
        kwargs[f.name] = _convert(values[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _convert(v: Any, want: Any, where: str) -> Any:
    """``v`` as type ``want`` (int, float, bool, str, or ``X | None``); a one-line ConfigError otherwise."""
    import types
    import typing

    if isinstance(want, types.UnionType) or typing.get_origin(want) is typing.Union:
        options = typing.get_args(want)
        if v is None and type(None) in options:
            return None
        (want,) = [t for t in options if t is not type(None)]
    name = getattr(want, "__name__", str(want))
    try:
        if want is bool:
            if not isinstance(v, bool):
                raise ValueError
        elif want is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            v = int(v)
        elif want is float:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)
        elif want is str:
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ValueError
            v = str(v)
        else:
            raise TypeError(f"unsupported annotation {want!r}")
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {where} must be {name}, got {v!r}") from None
    return v


def parse_set(item: str) -> dict:
    """``"distill.epochs=5"`` -> ``{"distill": {"epochs": 5}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set expects stage.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None,
    profile: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    extra: dict | None = None,
) -> Config:
    """Build the run's configuration: defaults <- ``path`` <- profile <- ``extra`` <- ``sets``."""
    try:
        raw = yaml.safe_load(default_params_text())
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"params file not found: {p}")
            user = yaml.safe_load(p.read_text()) or {}
            if not isinstance(user, dict):
                raise ConfigError(f"{p}: expected a mapping of stages")
            profiles = {**raw.get("profiles", {}), **user.pop("profiles", {})}
            raw = _merge({k: v for k, v in raw.items() if k != "profiles"}, user, "")
            raw["profiles"] = profiles
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file is not valid YAML: {str(exc).splitlines()[0]}") from None
    profiles = raw.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(sorted(profiles)) or 'none'}")
        raw = _merge(raw, profiles[profile], "")
    if extra:
        raw = _merge(raw, extra, "")
    for item in sets:
        raw = _merge(raw, parse_set(item), "")
    unknown = set(raw) - set(_SECTIONS) - set(_TOP)
    if unknown:
        raise ConfigError(f"unknown parameter group(s): {', '.join(sorted(unknown))}")
    sections = {name: _coerce(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()}
    try:
        seed = int(raw["seed"])
    except (TypeError, ValueError):
        raise ConfigError(f"seed must be an integer, got {raw['seed']!r}") from None
    return Config(seed=seed, device=str(raw["device"]), precision=str(raw["precision"]), profile=profile, **sections)
