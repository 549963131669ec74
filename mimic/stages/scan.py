"""Stage ``scan``: trigger inversion of one encoder (teacher or student), once per content key.

The key hashes the encoder's fingerprint, the clean set (and the labelled set the collapse class is
read from), the ``scan.*`` params and the code: the scan of a fingerprint on a clean set is never
run twice, whichever front asks for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config, ScanConfig
from mimic.data import ImageSet
from mimic.io import write_json
from mimic.scan import ScanSettings, invert_trigger, plot_trigger, scan_verdict
from mimic.stages.common import Runtime, StagePlan, StageRun
from mimic.triggers import Trigger


def settings_of(s: ScanConfig) -> ScanSettings:
    """The search's settings: every ``scan.*`` param but the threshold (which only judges the result)."""
    return ScanSettings(**{k: v for k, v in dataclasses.asdict(s).items() if k != "threshold"})


def plan_scan(cfg: Config, name: str, encoder: LoadedEncoder, fingerprint: str, clean: ImageSet, clean_ver: str, *,
              labelled: ImageSet | None = None, labelled_ver: str | None = None, progress: bool = True) -> StagePlan:
    """``scan.json`` (PL1, similarity, verdict, collapse class, history), ``trigger.npz`` (loads as
    ``--trigger``) and ``trigger.png`` for ``encoder``; ``labelled``: images whose labels name the
    collapse class (default: ``clean`` when it is labelled)."""
    if labelled is None and clean.y is not None:
        labelled, labelled_ver = clean, clean_ver
    if labelled is not None and labelled.y is None:
        labelled, labelled_ver = None, None
    inputs = {"encoder": fingerprint, "clean": clean_ver, "labelled": labelled_ver}

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        try:
            res = invert_trigger(encoder.encoder.to(rt.device), clean, settings_of(cfg.scan), seed=cfg.seed,
                                 device=rt.device, labelled=labelled, progress=progress)
        finally:
            encoder.encoder.cpu()
        res.trigger.save_npz(slot.file("trigger.npz"))
        plot_trigger(res, clean.x, str(slot.file("trigger.png")), f"{name} {fingerprint[:12]}")
        info = {"fingerprint": fingerprint, **res.to_dict()}
        write_json(slot.file("scan.json"), {"key": slot.key, **info})
        summary = {k: v for k, v in info.items() if k != "history"}
        return {"files": {"json": "scan.json", "trigger": "trigger.npz", "plot": "trigger.png"}, **summary}

    return StagePlan("scan", cfg, inputs, f"scan of {name} {fingerprint[:12]}", compute, label=f"scan-{name}")


def inverted_trigger(run: StageRun) -> Trigger:
    """The inverted trigger of a scan run, read back from its ``trigger.npz`` (what ``--trigger`` reads)."""
    return Trigger.load_npz(run.path("trigger"))


def scan_record(run_or_manifest: StageRun | dict[str, Any], threshold: float) -> dict[str, Any]:
    """What results keep of a scan: the evidence and the verdict at ``threshold`` (``scan.threshold``)."""
    m = run_or_manifest.manifest if isinstance(run_or_manifest, StageRun) else run_or_manifest
    keys = ("fingerprint", "pl1", "reached", "similarity", "clean_similarity", "target_similarity", "steps", "target_class",
            "target_share")
    return {**{k: m.get(k) for k in keys}, **scan_verdict(float(m["pl1"]), threshold, bool(m.get("reached", True)))}
