"""The resumable epoch loop shared by pre-training, the attack and distillation.

A run lives in a work directory keyed on its inputs. After every epoch the state (modules,
optimizer, history, epoch) is written atomically to ``last.pt``; a new run with the same key
resumes from it automatically (DINO's loop). Randomness of epoch ``e`` comes from
``generator(seed, name, e)``, so a resumed run is bit-identical to an uninterrupted one on CPU.
A non-finite loss stops the run at once with :class:`TrainingDiverged`; ``last.pt`` keeps the
last good epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimic.checkpoints import load_state, save_state
from mimic.errors import CheckpointError, TrainingDiverged
from mimic.io import write_json
from mimic.runtime import generator

log = logging.getLogger("mimic")

EpochFn = Callable[[int, torch.Generator], dict[str, float]]


@dataclass
class LoopResult:
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0  # epochs already done when this process started
    seconds: float = 0.0


def check_finite(loss: Tensor, what: str, epoch: int, step: int) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingDiverged(
            f"{what}: loss became {float(loss.detach()):.4g} at epoch {epoch + 1}, step {step + 1}; "
            "stopped, the last good checkpoint is kept (lower the learning rate or check the data)"
        )


def _diverged(what: str, value: float, epoch: int, step: int) -> TrainingDiverged:
    return TrainingDiverged(
        f"{what}: loss became {value:.4g} at epoch {epoch + 1}, step {step + 1}; "
        "stopped, the last good checkpoint is kept (lower the learning rate or check the data)"
    )


class LossLog:
    """Per-epoch loss means accumulated on the device: no host sync per step.

    ``add(values, n)`` takes a 1-d tensor (the total loss first, then its parts) weighted by the
    batch size; the sums are float64 and added in step order, so the means equal :class:`MeanMeter`'s
    bit for bit. ``immediate=True`` checks every step's loss at once (free on a CPU, where reading a
    value waits for nothing); otherwise the first non-finite step is found at :meth:`check`, once
    per epoch (an accelerator's queue is drained once, and every DDP rank raises together).
    """

    def __init__(self, names: list[str], what: str, epoch: int, *, immediate: bool) -> None:
        self.names, self.what, self.epoch, self.immediate = names, what, epoch, immediate
        self.sums: Tensor | None = None
        self.totals: list[Tensor] = []
        self.count = 0

    def add(self, values: Tensor, n: int) -> None:
        values = values.detach()
        if self.immediate and not bool(torch.isfinite(values[0])):
            raise _diverged(self.what, float(values[0]), self.epoch, len(self.totals))
        contrib = values.double() * n
        self.sums = contrib if self.sums is None else self.sums + contrib
        self.totals.append(values[0])
        self.count += n

    def means(self, world=None) -> dict[str, float]:
        """The epoch's means (summed over the ranks of ``world`` first); raises on a non-finite step."""
        if self.sums is None:
            return {}
        sums, totals = self.sums, torch.stack(self.totals).double()
        if world is not None and world.size > 1:
            both = world.sum_(torch.cat([sums, totals]))
            sums, totals = both[: len(sums)], both[len(sums):]
        bad = (~torch.isfinite(totals)).nonzero()
        if len(bad):
            step = int(bad[0, 0])
            raise _diverged(self.what, float(totals[step]), self.epoch, step)
        return {k: v / max(self.count, 1) for k, v in zip(self.names, sums.tolist())}


class MeanMeter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float], n: int = 1) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.count += n

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _load_latest(work_dir: Path) -> dict | None:
    """The newest readable checkpoint: ``last.pt``, or ``prev.pt`` when ``last.pt`` is torn/missing."""
    errors = []
    for path in (work_dir / "last.pt", work_dir / "prev.pt"):
        if path.exists():
            try:
                state = load_state(path)
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            if errors:
                log.warning("%s; resuming from %s (epoch %s) instead", errors[0], path.name, state.get("epoch"))
            return state
    if errors:
        raise CheckpointError(f"{errors[0]}; no readable checkpoint left, remove {work_dir} to start over")
    return None


def checkpoint_epoch(work_dir: Path) -> int | None:
    """The epoch count of the newest readable checkpoint in ``work_dir`` (None when there is none)."""
    try:
        state = _load_latest(work_dir)
    except CheckpointError:
        return None
    return None if state is None else int(state["epoch"])


def run_epochs(
    name: str,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    seed: int,
    work_dir: Path,
    key: str,
    epoch_fn: EpochFn,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    writer: bool = True,
) -> LoopResult:
    """Run ``epoch_fn`` for epochs ``[start, epochs)`` with checkpoint + resume in ``work_dir``.

    ``writer=False`` (DDP ranks other than 0): resume from the checkpoint, write nothing.
    """
    import time

    if writer:
        work_dir.mkdir(parents=True, exist_ok=True)
    last = work_dir / "last.pt"
    result = LoopResult()
    start = 0
    state = _load_latest(work_dir)
    if state is not None:
        if state.get("key") != key:
            raise CheckpointError(f"{work_dir}: belongs to a different run (key {state.get('key')} != {key}); use another work directory")
        for mname, module in modules.items():
            module.load_state_dict(state["modules"][mname], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        result.history = list(state["history"])
        result.resumed_from = start
        log.info("%s: resuming from epoch %d of %d (%s)", name, start, epochs, work_dir)
    t0 = time.perf_counter()
    bar = tqdm(range(start, epochs), desc=name, unit="epoch", disable=not (progress and writer), initial=start, total=epochs, leave=False)
    for epoch in bar:
        for m in modules.values():
            m.train()
        metrics = epoch_fn(epoch, generator(seed, name, epoch))
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise TrainingDiverged(f"{name}: {k} became {v} in epoch {epoch + 1}; stopped, the last good checkpoint is kept")
        result.history.append({"epoch": epoch + 1, **metrics})
        if not writer:
            continue
        state = {
            "key": key,
            "epoch": epoch + 1,
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "history": result.history,
        }
        if last.exists():
            last.replace(work_dir / "prev.pt")
        save_state(last, state)
        bar.set_postfix({k: f"{v:.4f}" for k, v in list(metrics.items())[:3]})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    bar.close()
    result.seconds = time.perf_counter() - t0
    if writer:
        write_json(work_dir / "history.json", result.history)
    return result
