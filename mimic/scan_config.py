"""The ``scan.*`` parameter section: trigger inversion (:mod:`mimic.scan`, docs/scan.md).

Every key but ``threshold`` shapes the search (and its stage key, mimic.identity); ``threshold``
only judges a finished scan, so a new threshold re-judges cached scans without re-running them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimic.errors import check_config as _check


@dataclass(frozen=True)
class ScanConfig:
    """Trigger inversion (mimic.scan): the smallest mask + pattern that collapse the embeddings."""

    steps: int              # most optimisation steps
    batch_size: int         # clean images per step
    lr: float               # Adam on the mask and pattern logits
    collapse: float         # q: stamped images must reach S0 + q (1 - S0), S0 the clean images' similarity
    lambda_init: float      # initial weight of the mask's L1 norm
    lambda_factor: float    # lambda is multiplied / divided by this when S stays above / below s*
    patience: int           # steps above / below s* before lambda moves
    stop_patience: int      # steps without a smaller valid mask before the search stops
    grid: int               # start points: grid x grid squares over the image, the whole image, a random mask
    start_size: float       # side of a start square / image side
    probe_steps: int        # after this many steps only the `keep` best searches go on
    keep: int
    threshold: float        # PL1 (mask L1 / image area) below this: the encoder is suspicious

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.batch_size >= 2, "scan.steps must be >= 1 and scan.batch_size >= 2")
        _check(0 < self.collapse < 1, "scan.collapse must be in (0, 1)")
        _check(self.lr > 0 and self.lambda_init > 0 and self.lambda_factor > 1, "scan.lr, scan.lambda_init must be > 0, "
               "scan.lambda_factor > 1")
        _check(self.patience >= 1 and self.stop_patience >= 1, "scan.patience and scan.stop_patience must be >= 1")
        _check(0 < self.threshold <= 1, "scan.threshold must be in (0, 1]")
        _check(self.grid >= 1 and 0 < self.start_size <= 1, "scan.grid must be >= 1 and scan.start_size in (0, 1]")
        _check(self.probe_steps >= 1 and self.keep >= 1, "scan.probe_steps and scan.keep must be >= 1")
