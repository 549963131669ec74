"""Stage ``attack``: a BadEncoder teacher made from a clean encoder (trigger, target, references inside)."""

from __future__ import annotations

from mimic.attacks.badencoder import badencoder
from mimic.attacks.common import check_attack_data, clean_fingerprint, prepare, save_teacher
from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.stages.common import Runtime, StagePlan, training_dir


def plan_attack(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the backdoored teacher, with its trigger and target as extras) and ``trigger.npz``."""
    check_attack_data(cfg, ds)
    clean_fp = clean_fingerprint(clean)
    inputs = {"clean": clean_fp, "data": ds.version}

    def compute(slot: Slot, cache: StageCache) -> dict:
        setup = prepare(cfg, clean.encoder, ds)
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "attack", cfg, inputs, cfg.attack.epochs, "BadEncoder attack") as (work, lk):
            teacher, res = badencoder(clean.encoder, setup.shadow, setup.reference, setup.trigger, cfg.attack, seed=cfg.seed,
                                      work_dir=work, key=lk, device=rt.device, amp_dtype=rt.amp, progress=progress)
        return save_teacher(slot, teacher, setup, setup.trigger, "badencoder", clean_fp, res.history)

    return StagePlan("attack", cfg, inputs, f"BadEncoder attack on {clean_fp[:12]}", compute)
