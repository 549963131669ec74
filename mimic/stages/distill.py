"""Stage ``distill``: the MIMIC student, resumable along its lineage (a longer run resumes a shorter one)."""

from __future__ import annotations

from collections.abc import Callable

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import ImageSet
from mimic.distill import distill, plot_losses
from mimic.fingerprint import fingerprint_encoder
from mimic.inputs import require_clean_size
from mimic.io import write_json
from mimic.mi import uniform_weights
from mimic.stages.common import Runtime, StagePlan, training_dir


def effective_weights(cfg: Config, weights: list[float]) -> list[float]:
    """The attention weights distillation uses: the MI weights, or uniform ones (``distill.weights``)."""
    if cfg.distill.weights == "uniform":
        return uniform_weights(len(weights), cfg.mi.base, cfg.mi.scale)
    return [float(w) for w in weights]


def plan_distill(
    cfg: Config, teacher: LoadedEncoder, teacher_fp: str, clean: ImageSet, clean_ver: str,
    weights: list[float], *, progress: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
) -> StagePlan:
    """``student.pt`` (+ ``losses.json``, ``losses.png``); checkpoints in the lineage directory."""
    d = cfg.distill
    require_clean_size(cfg, clean)
    w = effective_weights(cfg, weights)
    inputs = {"teacher": teacher_fp, "clean": clean_ver, "weights": [round(v, 6) for v in w]}

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "distill", cfg, inputs, d.epochs, f"distillation of {teacher_fp[:12]}") as (work, lk):
            res = distill(teacher.encoder, clean, d, w, seed=cfg.seed, work_dir=work, key=lk, device=rt.device,
                          amp_dtype=rt.amp, progress=progress, on_epoch_end=on_epoch_end)
        fp = fingerprint_encoder(res.student)
        meta = {"stage": "distill", "key": slot.key, "lineage": lk, "teacher_fingerprint": teacher_fp, "data": clean_ver,
                "weights": w, "resumed_from_epoch": res.resumed_from}
        save_encoder(slot.file("student.pt"), res.student, meta=meta)
        write_json(slot.file("losses.json"), {"history": res.history})
        plot_losses(res.history, str(slot.file("losses.png")))
        return {"files": {"student": "student.pt", "losses": "losses.json", "plot": "losses.png"}, "fingerprint": fp,
                "lineage": lk, "weights": w, "resumed_from_epoch": res.resumed_from, "epochs": d.epochs,
                "train_seconds": round(res.seconds, 2), "history": res.history}

    return StagePlan("distill", cfg, inputs, f"distillation of {teacher_fp[:12]}", compute)
