"""The stages of an audit, each a function of loaded inputs that runs once per content key.

``pretrain`` and the attacks (``attack`` = BadEncoder, ``drupe``, ``adaptive``) make the encoders of
demos, tests and the attack zoo; ``mi``, ``distill`` and ``evaluate`` are the audit; ``unlearn`` and
``prune`` are the baseline defences the zoo compares MIMIC with. Every stage computes its key with :mod:`mimic.identity`, runs in its
:class:`mimic.cache.StageCache` slot (reusing a finished run) and returns a :class:`StageRun`:
plain data and paths, never tensors, so any front (CLI, DVC, Prefect) can pass it on.
"""

from mimic.stages.common import Runtime, StageRun

__all__ = ["Runtime", "StageRun"]
