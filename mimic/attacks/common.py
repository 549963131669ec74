"""What every attack of the zoo shares: its setup from ``attack.*`` and how its teacher is saved.

An attack starts from a clean encoder and the attacker's labelled data: the trigger (``attack.trigger_*``),
the reference images (the ``attack.n_reference`` most typical target-class images, by their clean
features), and a stratified shadow set of ``attack.shadow_size`` training images. The backdoored
teacher is saved with its trigger, target class and references as extras, so every later stage
(evaluation, unlearning) can read them from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mimic.cache import Slot
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import Dataset, ImageSet, stratified_indices, to_float
from mimic.encoders import Encoder, evaluating
from mimic.errors import DataError
from mimic.evaluate import extract_features
from mimic.fingerprint import fingerprint_encoder
from mimic.triggers import Trigger, make_trigger


@dataclass(frozen=True)
class AttackSetup:
    trigger: Trigger
    reference: Tensor  # uint8 [n_reference, 3, H, W]
    shadow: ImageSet
    target: int


def check_attack_data(cfg: Config, ds: Dataset) -> None:
    if ds.train.y is None:
        raise DataError("the attack needs labelled data to pick reference images of the target class")
    if not 0 <= cfg.attack.target_class < ds.num_classes:
        raise DataError(f"attack.target_class {cfg.attack.target_class} out of range for {ds.num_classes} classes")


def typical_references(encoder: Encoder, images: Tensor, candidates: Tensor, n: int, pool: int = 1000) -> Tensor:
    """The attacker's reference images: the ``n`` target-class images whose clean features lie
    closest to the class's mean feature (a representative target, as a careful attacker picks)."""
    candidates = candidates[:pool]
    feats = extract_features(encoder, images[candidates])
    centre = torch.nn.functional.normalize(feats.mean(0), dim=0)
    order = torch.argsort(feats @ centre, descending=True, stable=True)
    return candidates[order[:n]]


def prepare(cfg: Config, clean: Encoder, ds: Dataset) -> AttackSetup:
    """Trigger, references and shadow set of an attack, from ``attack.*`` and the seed."""
    a = cfg.attack
    check_attack_data(cfg, ds)
    assert ds.train.y is not None
    trigger = make_trigger(a.trigger_size, a.trigger_margin, a.trigger_position, a.trigger_pattern, a.trigger_colour,
                           a.trigger_alpha, ds.train.x.shape[-1], cfg.seed)
    target_idx = torch.nonzero(ds.train.y == a.target_class).flatten()
    if len(target_idx) < a.n_reference:
        raise DataError(f"only {len(target_idx)} images of the target class; need {a.n_reference} references")
    reference = ds.train.x[typical_references(clean, ds.train.x, target_idx, a.n_reference)]
    shadow = ds.train.subset(stratified_indices(len(ds.train), ds.train.y, min(a.shadow_size, len(ds.train)), cfg.seed + 4))
    return AttackSetup(trigger, reference, shadow, int(a.target_class))


def features(encoder: nn.Module, x: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    """Raw (unnormalised) features of uint8 images ``x`` on ``device``, without gradients."""
    with evaluating(encoder):
        return torch.cat([encoder(to_float(x[i : i + batch_size], device)) for i in range(0, len(x), batch_size)])


def save_teacher(slot: Slot, teacher: Encoder, setup: AttackSetup, trigger: Trigger, method: str, clean_fp: str,
                 history: list[dict[str, float]]) -> dict[str, Any]:
    """``encoder.pt`` (trigger, target, references as extras) and ``trigger.npz``; the manifest."""
    extras = {**trigger.to_extras(), "reference_images": setup.reference.clone(), "target_class": setup.target}
    save_encoder(slot.file("encoder.pt"), teacher, extras=extras, meta={
        "stage": slot.stage, "key": slot.key, "attack": method, "clean": clean_fp,
        "history": history})
    trigger.save_npz(slot.file("trigger.npz"))
    return {"files": {"encoder": "encoder.pt", "trigger": "trigger.npz"}, "fingerprint": fingerprint_encoder(teacher),
            "clean": clean_fp, "attack": method, "target_class": setup.target, "history": history}


def clean_fingerprint(clean: LoadedEncoder) -> str:
    return fingerprint_encoder(clean.encoder)

