"""Stage ``unlearn``: the teacher fine-tuned on the clean set D to forget a (given or inverted) trigger."""

from __future__ import annotations

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import ImageSet
from mimic.defenses.unlearn import unlearn
from mimic.fingerprint import fingerprint_encoder
from mimic.inputs import trigger_identity
from mimic.stages.common import Runtime, StagePlan, training_dir
from mimic.triggers import Trigger


def plan_unlearn(cfg: Config, teacher: LoadedEncoder, teacher_fp: str, clean: ImageSet, clean_ver: str, trigger: Trigger,
                 *, progress: bool = True) -> StagePlan:
    """``encoder.pt``: the unlearned teacher (its trigger/target record kept, to measure ASR)."""
    inputs = {"teacher": teacher_fp, "clean": clean_ver, "trigger": trigger_identity(trigger)}

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "unlearn", cfg, inputs, cfg.unlearn.epochs, f"unlearning of {teacher_fp[:12]}") as (work, lk):
            enc, res = unlearn(teacher.encoder, clean, trigger, cfg.unlearn, seed=cfg.seed, work_dir=work, key=lk,
                               device=rt.device, amp_dtype=rt.amp, progress=progress)
        fp = fingerprint_encoder(enc)
        save_encoder(slot.file("encoder.pt"), enc, extras=dict(teacher.extras), meta={
            "stage": "unlearn", "key": slot.key, "teacher_fingerprint": teacher_fp, "data": clean_ver, "history": res.history})
        return {"files": {"encoder": "encoder.pt"}, "fingerprint": fp, "defence": "unlearn", "teacher": teacher_fp,
                "trigger": inputs["trigger"], "images": len(clean), "history": res.history}

    return StagePlan("unlearn", cfg, inputs, f"unlearning of {teacher_fp[:12]}", compute)
