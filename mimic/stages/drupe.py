"""Stage ``drupe``: a DRUPE teacher (distribution-preserving BadEncoder) made from a clean encoder."""

from __future__ import annotations

from mimic.attacks.drupe import drupe
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.stages.attacking import plan_teacher_attack
from mimic.stages.common import StagePlan


def plan_drupe(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the teacher, trigger/target/references as extras) and ``trigger.npz``."""
    return plan_teacher_attack(cfg, clean, ds, stage="drupe", method="drupe", label="DRUPE attack", progress=progress,
                               run=lambda s, **kw: drupe(clean.encoder, s.shadow, s.reference, s.trigger, cfg.attack, cfg.drupe, **kw))
