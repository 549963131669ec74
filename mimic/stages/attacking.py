"""What the attack stages share (``attack``: BadEncoder, ``drupe``): the teacher made from a clean
encoder by one attack function, cached and resumable, saved with its trigger, target and references.
Each stage module imports only its own attack, so editing one attack leaves the other's cache valid."""

from __future__ import annotations

from collections.abc import Callable

from mimic.attacks.common import AttackSetup, check_attack_data, clean_fingerprint, prepare, save_teacher
from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.encoders import Encoder
from mimic.stages.common import Runtime, StagePlan, training_dir
from mimic.training import LoopResult

# run(setup, seed=, work_dir=, key=, device=, amp_dtype=, progress=) -> (teacher, loop result)
AttackRun = Callable[..., tuple[Encoder, LoopResult]]


def plan_teacher_attack(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, stage: str, method: str, label: str,
                        run: AttackRun, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the backdoored teacher, with its trigger and target as extras) and ``trigger.npz``."""
    check_attack_data(cfg, ds)
    clean_fp = clean_fingerprint(clean)
    inputs = {"clean": clean_fp, "data": ds.version}

    def compute(slot: Slot, cache: StageCache) -> dict:
        setup: AttackSetup = prepare(cfg, clean.encoder, ds)
        rt = Runtime.from_config(cfg)
        with training_dir(cache, stage, cfg, inputs, cfg.attack.epochs, label) as (work, lk):
            teacher, res = run(setup, seed=cfg.seed, work_dir=work, key=lk, device=rt.device, amp_dtype=rt.amp,
                               progress=progress)
        return save_teacher(slot, teacher, setup, setup.trigger, method, clean_fp, res.history)

    return StagePlan(stage, cfg, inputs, f"{label} on {clean_fp[:12]}", compute)
