"""What every stage shares: the runtime (device, precision) and running a stage in its cache slot."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimic.cache import Slot, StageCache, finished
from mimic.config import Config
from mimic.errors import DataError
from mimic.identity import lineage_key, stage_identity, stage_key
from mimic.runtime import autocast_dtype, resolve_device


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: torch.dtype | None

    @classmethod
    def from_config(cls, cfg: Config) -> "Runtime":
        device = resolve_device(cfg.device)
        return cls(device, autocast_dtype(device, cfg.precision))


@dataclass(frozen=True)
class StageRun:
    """One stage run: its key, directory, manifest (outputs + summary) and whether it was reused."""

    stage: str
    key: str
    dir: Path
    manifest: dict[str, Any]
    cached: bool

    def path(self, name: str) -> Path:
        return self.dir / self.manifest["files"][name]

    @property
    def seconds(self) -> float:
        return 0.0 if self.cached else float(self.manifest.get("seconds", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "dir": str(self.dir), "manifest": self.manifest, "cached": self.cached}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, cached: bool | None = None) -> "StageRun":
        return cls(d["stage"], d["key"], Path(d["dir"]), dict(d["manifest"]), d["cached"] if cached is None else cached)


@dataclass(frozen=True)
class StagePlan:
    """A stage ready to run: its inputs (hence its key) are known; ``compute(slot, cache)`` makes its outputs."""

    stage: str
    cfg: Config
    inputs: Mapping[str, Any]
    what: str  # for lock messages and logs, e.g. "distillation of 3fa2..."
    compute: Callable[[Slot, StageCache], dict[str, Any]]
    label: str = ""  # the run's name in an audit (default: the stage), e.g. "evaluate-student"

    @property
    def name(self) -> str:
        return self.label or self.stage

    @property
    def key(self) -> str:
        return stage_key(self.stage, self.cfg, self.inputs)

    def run(self, cache: StageCache) -> StageRun:
        """Run in the cache slot of ``key`` unless a finished run exists there (then reuse it)."""
        key = self.key
        with cache.slot(self.stage, key, self.what) as slot:
            if slot.manifest is not None:
                return StageRun(self.stage, key, slot.dir, slot.manifest, True)
            t0 = time.perf_counter()
            manifest = self.compute(slot, cache)
            manifest = {**manifest, "identity": stage_identity(self.stage, self.cfg, self.inputs),
                        "seconds": round(time.perf_counter() - t0, 2)}
            return StageRun(self.stage, key, slot.dir, slot.commit(manifest), False)


@contextlib.contextmanager
def training_dir(cache: StageCache, stage: str, cfg: Config, inputs: Mapping[str, Any], epochs: int,
                 what: str) -> Iterator[tuple[Path, str]]:
    """The locked checkpoint directory of a training stage's resume lineage, and the lineage key.

    A run longer than the lineage's last checkpoint resumes from it; a shorter one (the lineage has
    already gone past ``epochs``) trains in its own sub-directory instead of truncating it.
    """
    from mimic.training import checkpoint_epoch

    lk = lineage_key(stage, cfg, inputs)
    with cache.lineage(stage, lk, what) as d:
        done = checkpoint_epoch(d)
        if done is not None and done > epochs:
            d = d / f"epochs-{epochs}"
        yield d, lk


def replay(dirs: Sequence[str | Path]) -> Callable[[StagePlan], StageRun]:
    """A runner that computes nothing: each stage's run is taken from the finished stage directories
    ``dirs`` (DVC outputs with their ``stage.json``), matched by stage and key; a missing or stale
    one is a one-line error."""
    found = [(Path(d), finished(Path(d))) for d in dirs]

    def run(plan: StagePlan) -> StageRun:
        key = plan.key
        for d, manifest in found:
            if manifest is not None and manifest.get("stage") == plan.stage and manifest.get("key") == key:
                return StageRun(plan.stage, key, d, manifest, True)
        raise DataError(f"no finished {plan.stage} output with key {key[:12]} in {', '.join(map(str, dirs))}: "
                        "stale or missing stage outputs (run the earlier stages again, e.g. `dvc repro`)")

    return run
