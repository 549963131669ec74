"""The parameter sections of the defences (``unlearn.*``, ``prune.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from mimic.errors import check_config as _check

PRUNE_METHODS = ("fineprune", "clp")


@dataclass(frozen=True)
class UnlearnConfig:
    """Unlearning with a trigger (:mod:`mimic.defenses.unlearn`), fine-tuning on the clean set D."""

    epochs: int
    batch_size: int
    lr: float
    lambda_keep: float      # weight of keeping the clean images' features (the unlearning term has weight 1)

    def __post_init__(self) -> None:
        _check(self.lr > 0, "unlearn.lr must be > 0")
        _check(self.lambda_keep >= 0, "unlearn.lambda_keep must be >= 0")


@dataclass(frozen=True)
class PruneConfig:
    """Pruning (:mod:`mimic.defenses.prune`): fine-pruning on D, or data-free CLP."""

    method: str             # fineprune (prune dormant channels on D, then fine-tune on D) | clp (data-free)
    ratio: float            # fineprune: share of the last stage's channels pruned (least active on D first)
    clp_u: float            # clp: prune a channel whose Lipschitz bound exceeds mean + u * std of its layer
    epochs: int             # fineprune: fine-tuning epochs on D (clp: unused)
    batch_size: int
    lr: float

    def __post_init__(self) -> None:
        _check(self.method in PRUNE_METHODS, f"prune.method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}")
        _check(0 <= self.ratio < 1, "prune.ratio must be in [0, 1)")
        _check(self.clp_u > 0, "prune.clp_u must be > 0")
        _check(self.lr > 0, "prune.lr must be > 0")
