"""Stage ``attack``: a BadEncoder teacher made from a clean encoder (trigger, target, references inside)."""

from __future__ import annotations

from mimic.attacks.badencoder import badencoder
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.stages.attacking import plan_teacher_attack
from mimic.stages.common import StagePlan


def plan_attack(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the backdoored teacher, with its trigger and target as extras) and ``trigger.npz``."""
    return plan_teacher_attack(cfg, clean, ds, stage="attack", method="badencoder", label="BadEncoder attack", progress=progress,
                               run=lambda s, **kw: badencoder(clean.encoder, s.shadow, s.reference, s.trigger, cfg.attack, **kw))
