"""Stage ``adaptive``: the attack aimed at MIMIC (a trigger learned against a shadow MIMIC student)."""

from __future__ import annotations

from mimic.attacks.adaptive import adaptive
from mimic.attacks.common import check_attack_data, clean_fingerprint, prepare, save_teacher
from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.stages.common import Runtime, StagePlan, training_dir


def plan_adaptive(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the teacher with its *learned* trigger, target, references as extras) and ``trigger.npz``."""
    check_attack_data(cfg, ds)
    clean_fp = clean_fingerprint(clean)
    inputs = {"clean": clean_fp, "data": ds.version}
    epochs = cfg.adaptive.student_warmup_epochs + cfg.attack.epochs

    def compute(slot: Slot, cache: StageCache) -> dict:
        setup = prepare(cfg, clean.encoder, ds)
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "adaptive", cfg, inputs, epochs, "adaptive attack") as (work, lk):
            teacher, trigger, res = adaptive(clean.encoder, setup.shadow, setup.reference, setup.trigger, cfg.attack,
                                             cfg.adaptive, seed=cfg.seed, work_dir=work, key=lk, device=rt.device,
                                             amp_dtype=rt.amp, progress=progress)
        return save_teacher(slot, teacher, setup, trigger, "adaptive", clean_fp, res.history)

    return StagePlan("adaptive", cfg, inputs, f"adaptive attack on {clean_fp[:12]}", compute)
