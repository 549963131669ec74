"""Stage ``mi``: per-stage mutual information of the teacher (or a random student) and the MIMIC weights."""

from __future__ import annotations

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import ImageSet
from mimic.encoders import make_student
from mimic.io import write_json
from mimic.mi import analyse, plot_mi
from mimic.stages.common import Runtime, StagePlan, StageRun


def plan_mi(cfg: Config, teacher: LoadedEncoder, teacher_fp: str, clean: ImageSet, clean_ver: str) -> StagePlan:
    """``mi.json`` (stages, MI, weights), ``mi_stages.json`` (one row per stage, for DVC plots), ``mi.png``."""
    m = cfg.mi

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        net = teacher.encoder if m.network == "teacher" else make_student(teacher.encoder, "empty", cfg.seed)
        net = net.to(rt.device)
        try:
            result = analyse(net, clean, estimator=m.estimator, epochs=m.epochs, batch_size=m.batch_size, lr=m.lr,
                             hidden=m.hidden, pool=m.pool, base=m.base, scale=m.scale, mapping=m.mapping,
                             temperature=m.temperature, seed=cfg.seed, device=rt.device)
        finally:
            net.cpu()
        info = {"network": m.network, "mapping": m.mapping, **({"temperature": m.temperature} if m.mapping == "softmax" else {}),
                **result.to_dict()}
        write_json(slot.file("mi.json"), {"key": slot.key, **info})
        write_json(slot.file("mi_stages.json"),
                   {"stages": [{"stage": s, "mi": info["mi"][s], "weight": info["weights"][s]} for s in info["stages"]]})
        plot_mi(result, str(slot.file("mi.png")))
        return {"files": {"json": "mi.json", "rows": "mi_stages.json", "plot": "mi.png"}, **info}

    return StagePlan("mi", cfg, {"teacher": teacher_fp, "clean": clean_ver}, f"MI of {teacher_fp[:12]}", compute)


def weights_of(run_or_manifest: StageRun | dict) -> list[float]:
    """The MIMIC weights of an MI run, in stage order."""
    m = run_or_manifest.manifest if isinstance(run_or_manifest, StageRun) else run_or_manifest
    return [float(m["weights"][s]) for s in m["stages"]]
