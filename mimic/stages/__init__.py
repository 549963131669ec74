"""The stages of an audit, each a function of loaded inputs that runs once per content key.

``pretrain`` and ``attack`` make the encoders of demos and tests; ``mi``, ``distill`` and
``evaluate`` are the audit. Every stage computes its key with :mod:`mimic.identity`, runs in its
:class:`mimic.cache.StageCache` slot (reusing a finished run) and returns a :class:`StageRun`:
plain data and paths, never tensors, so any front (CLI, DVC, Prefect) can pass it on.
"""

from mimic.stages.common import Runtime, StageRun

__all__ = ["Runtime", "StageRun"]
