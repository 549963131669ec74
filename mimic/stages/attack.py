"""Stage ``attack``: a BadEncoder teacher made from a clean encoder (trigger, target, references inside)."""

from __future__ import annotations

import torch

from mimic.attacks.badencoder import badencoder, typical_references
from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import Dataset, stratified_indices
from mimic.errors import DataError
from mimic.fingerprint import fingerprint_encoder
from mimic.stages.common import Runtime, StagePlan, training_dir
from mimic.triggers import make_trigger


def plan_attack(cfg: Config, clean: LoadedEncoder, ds: Dataset, *, progress: bool = True) -> StagePlan:
    """``encoder.pt`` (the backdoored teacher, with its trigger and target as extras) and ``trigger.npz``."""
    a = cfg.attack
    if ds.train.y is None:
        raise DataError("the attack needs labelled data to pick reference images of the target class")
    if not 0 <= a.target_class < ds.num_classes:
        raise DataError(f"attack.target_class {a.target_class} out of range for {ds.num_classes} classes")
    clean_fp = fingerprint_encoder(clean.encoder)
    inputs = {"clean": clean_fp, "data": ds.version}

    def compute(slot: Slot, cache: StageCache) -> dict:
        trigger = make_trigger(a.trigger_size, a.trigger_margin, a.trigger_position, a.trigger_pattern, a.trigger_colour,
                               a.trigger_alpha, ds.train.x.shape[-1], cfg.seed)
        target_idx = torch.nonzero(ds.train.y == a.target_class).flatten()
        if len(target_idx) < a.n_reference:
            raise DataError(f"only {len(target_idx)} images of the target class; need {a.n_reference} references")
        reference = ds.train.x[typical_references(clean.encoder, ds.train.x, target_idx, a.n_reference)]
        shadow = ds.train.subset(stratified_indices(len(ds.train), ds.train.y, min(a.shadow_size, len(ds.train)), cfg.seed + 4))
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "attack", cfg, inputs, a.epochs, "BadEncoder attack") as (work, lk):
            teacher, res = badencoder(clean.encoder, shadow, reference, trigger, a, seed=cfg.seed, work_dir=work, key=lk,
                                      device=rt.device, amp_dtype=rt.amp, progress=progress)
        extras = {**trigger.to_extras(), "reference_images": reference.clone(), "target_class": int(a.target_class)}
        save_encoder(slot.file("encoder.pt"), teacher, extras=extras, meta={
            "stage": "attack", "key": slot.key, "attack": "badencoder", "clean": clean_fp, "history": res.history})
        trigger.save_npz(slot.file("trigger.npz"))
        return {"files": {"encoder": "encoder.pt", "trigger": "trigger.npz"}, "fingerprint": fingerprint_encoder(teacher),
                "clean": clean_fp, "target_class": int(a.target_class), "history": res.history}

    return StagePlan("attack", cfg, inputs, f"BadEncoder attack on {clean_fp[:12]}", compute)
