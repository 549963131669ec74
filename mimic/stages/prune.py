"""Stage ``prune``: fine-pruning on the clean set D, or data-free CLP (``prune.method``)."""

from __future__ import annotations

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import ImageSet
from mimic.defenses.prune import clp, fine_prune
from mimic.fingerprint import fingerprint_encoder
from mimic.stages.common import Runtime, StagePlan, training_dir


def plan_prune(cfg: Config, teacher: LoadedEncoder, teacher_fp: str, clean: ImageSet, clean_ver: str,
               *, progress: bool = True) -> StagePlan:
    """``encoder.pt``: the pruned teacher (its trigger/target record kept, to measure ASR)."""
    p = cfg.prune
    inputs = {"teacher": teacher_fp, "clean": clean_ver if p.method == "fineprune" else None}

    def compute(slot: Slot, cache: StageCache) -> dict:
        history: list[dict] = []
        if p.method == "clp":
            enc, pruned = clp(teacher.encoder, p.clp_u)
        else:
            rt = Runtime.from_config(cfg)
            with training_dir(cache, "prune", cfg, inputs, p.epochs, f"fine-pruning of {teacher_fp[:12]}") as (work, lk):
                enc, pruned, res = fine_prune(teacher.encoder, clean, p, seed=cfg.seed, work_dir=work, key=lk,
                                              device=rt.device, amp_dtype=rt.amp, progress=progress)
            history = res.history
        counts = {k: len(v) for k, v in pruned.items() if v}
        save_encoder(slot.file("encoder.pt"), enc, extras=dict(teacher.extras), meta={
            "stage": "prune", "key": slot.key, "method": p.method, "teacher_fingerprint": teacher_fp, "pruned": pruned,
            "history": history})
        return {"files": {"encoder": "encoder.pt"}, "fingerprint": fingerprint_encoder(enc), "defence": p.method,
                "teacher": teacher_fp, "pruned_channels": sum(counts.values()), "pruned": counts,
                "images": len(clean) if p.method == "fineprune" else 0, "history": history}

    return StagePlan("prune", cfg, inputs, f"pruning ({p.method}) of {teacher_fp[:12]}", compute)
