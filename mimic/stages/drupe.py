"""Stage ``drupe``: a DRUPE teacher (distribution-preserving BadEncoder) made from a clean encoder."""

from __future__ import annotations

from mimic.attacks.common import check_attack_data, clean_fingerprint, prepare, save_teacher
from mimic.attacks.drupe import drupe
from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.stages.common import Runtime, StagePlan, training_dir


def plan_drupe(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the teacher, trigger/target/references as extras) and ``trigger.npz``."""
    check_attack_data(cfg, ds)
    clean_fp = clean_fingerprint(clean)
    inputs = {"clean": clean_fp, "data": ds.version}

    def compute(slot: Slot, cache: StageCache) -> dict:
        setup = prepare(cfg, clean.encoder, ds)
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "drupe", cfg, inputs, cfg.attack.epochs, "DRUPE attack") as (work, lk):
            teacher, res = drupe(clean.encoder, setup.shadow, setup.reference, setup.trigger, cfg.attack, cfg.drupe,
                                 seed=cfg.seed, work_dir=work, key=lk, device=rt.device, amp_dtype=rt.amp, progress=progress)
        return save_teacher(slot, teacher, setup, setup.trigger, "drupe", clean_fp, res.history)

    return StagePlan("drupe", cfg, inputs, f"DRUPE attack on {clean_fp[:12]}", compute)
