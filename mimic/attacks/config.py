"""The parameter sections of the attacks beyond BadEncoder (``drupe.*``, ``adaptive.*``).

The knobs every attack shares (trigger, target class, references, shadow set, epochs, learning
rate, utility weights) are ``attack.*`` (:class:`mimic.config.AttackConfig`); these sections add
what one attack alone reads, so editing them re-runs that attack only.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimic.errors import check_config as _check


@dataclass(frozen=True)
class DrupeConfig:
    """DRUPE (Tao et al., S&P 2024): BadEncoder with the triggered feature distribution kept close
    to the clean one (:mod:`mimic.attacks.drupe`)."""

    lambda_distribution: float   # sliced Wasserstein distance triggered vs clean features, / clean feature std
    lambda_concentration: float  # mean pairwise cosine among triggered features (no tight cluster)
    lambda_balance: float        # std over the references of the mean similarity to each (use all of them)
    warmup_epochs: int           # epochs of multi-reference BadEncoder before the two distribution terms start
    projections: int             # random directions of the sliced Wasserstein distance

    def __post_init__(self) -> None:
        for name in ("lambda_distribution", "lambda_concentration", "lambda_balance"):
            _check(getattr(self, name) >= 0, f"drupe.{name} must be >= 0")
        _check(self.warmup_epochs >= 0, "drupe.warmup_epochs must be >= 0")
        _check(self.projections >= 1, "drupe.projections must be >= 1")


@dataclass(frozen=True)
class AdaptiveConfig:
    """The attack aimed at MIMIC (:mod:`mimic.attacks.adaptive`): the trigger pattern is learned
    against a shadow MIMIC student distilled from the teacher on clean images during the attack."""

    trigger_lr: float            # Adam learning rate of the trigger pattern (inside the fixed trigger mask)
    lambda_student: float        # weight of the shadow student's effectiveness in the trigger's objective
    lambda_clean_trigger: float  # penalty on the clean encoder's response to the trigger (keeps it a backdoor)
    student_lr: float            # Adam learning rate of the shadow student (MIMIC's: 1e-2)
    student_warmup_epochs: int   # epochs the shadow student is distilled from the clean encoder first
    lambda_clone: float          # the shadow distillation's clone weight (its attention weights are uniform)

    def __post_init__(self) -> None:
        _check(self.trigger_lr > 0 and self.student_lr > 0, "adaptive.trigger_lr and adaptive.student_lr must be > 0")
        for name in ("lambda_student", "lambda_clean_trigger", "lambda_clone"):
            _check(getattr(self, name) >= 0, f"adaptive.{name} must be >= 0")
        _check(self.student_warmup_epochs >= 0, "adaptive.student_warmup_epochs must be >= 0")
