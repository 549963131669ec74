"""The one results schema: what ``mimic demo``, ``mimic audit``, the Prefect flow and ``dvc repro`` write.

``results.json`` is versioned (``schema``) and described by ``docs/results.schema.json``. Accuracies
are percentages; the ``teacher_*``/``student_*`` shortcuts are the primary probe's numbers (the
standard protocol: raw L2-normalised features), every probe's are under ``probes`` (kind x protocol,
see :mod:`mimic.evaluate`), and ``worst_case`` holds the highest student ASR and the largest CA drop
over all of them: the numbers the gate judges. ``scan`` holds the trigger-inversion evidence of
teacher and student (``teacher_pl1``/``student_pl1`` the shortcuts) and ``asr_trigger`` which trigger
each ASR used (``given``, ``teacher``: stored in the teacher file, ``inverted``: the teacher scan's).
The environment is stamped here, once, for every command.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "mimic.results/2"  # 2: probe protocols + worst_case, scan evidence (scan, teacher_pl1, student_pl1, asr_trigger)


def git_revision() -> str | None:
    """The source checkout's git revision, when mimic runs from one."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


def environment(device: str = "auto", seed: int | None = None) -> dict[str, Any]:
    """Plain facts about where a run happened: versions, device, threads, seed, git revision."""
    import torch

    from mimic import __version__
    from mimic.runtime import resolve_device

    dev = resolve_device(device)
    info: dict[str, Any] = {
        "mimic": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(dev), "threads": torch.get_num_threads(), "seed": seed, "git": git_revision(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def primary_probe(probe_setting: str) -> str:
    """The probe whose numbers are the headline (``evaluate.probe``: linear, mlp or both -> linear)."""
    return "mlp" if probe_setting == "mlp" else "linear"


def _pick(evaluation: Mapping | None, probe: str, what: str) -> float | None:
    if not evaluation:
        return None
    return evaluation.get("probes", {}).get(probe, {}).get(what)


def worst_case(evaluations: Mapping[str, Mapping]) -> dict[str, Any]:
    """Over every probe run on both teacher and student: the highest student ASR and the largest CA
    drop (teacher CA - student CA), each with the probe that gave it. A backdoor that one protocol
    misses is still judged by the protocol that sees it."""
    t, s = evaluations.get("teacher"), evaluations.get("student")
    if not (t and s):
        return {}
    names = [n for n in s["probes"] if n in t["probes"]]
    out: dict[str, Any] = {}
    asr = [(s["probes"][n]["asr"], n) for n in names if s["probes"][n].get("asr") is not None]
    if asr:
        out["student_asr"], out["asr_probe"] = max(asr, key=lambda v: v[0])
    drops = [(t["probes"][n]["ca"] - s["probes"][n]["ca"], n) for n in names]
    if drops:
        drop, n = max(drops, key=lambda v: v[0])
        out.update({"ca_drop": round(drop, 2), "ca_probe": n, "teacher_ca": t["probes"][n]["ca"],
                    "student_ca": s["probes"][n]["ca"]})
    return out


def stage_record(run: Any) -> dict[str, Any]:
    """``{"key", "cached", "seconds"}`` of a :class:`mimic.stages.StageRun`."""
    return {"key": run.key, "cached": bool(run.cached), "seconds": round(run.seconds, 2)}


def scan_tags(results: Mapping[str, Any]) -> dict[str, str]:
    """Registry / MLflow tags of the scan evidence: ``scan_verdict`` (the student's: the registered
    model is the student), ``teacher_scan_verdict``, ``teacher_pl1``, ``student_pl1``."""
    scan = results.get("scan") or {}
    tags = {}
    if "student" in scan:
        tags["scan_verdict"] = str(scan["student"]["verdict"])
    if "teacher" in scan:
        tags["teacher_scan_verdict"] = str(scan["teacher"]["verdict"])
    for who in ("teacher", "student"):
        if results.get(f"{who}_pl1") is not None:
            tags[f"{who}_pl1"] = f"{results[f'{who}_pl1']:.4f}"
    return tags


def build_results(
    cfg: Any, *, kind: str, teacher: Mapping[str, Any], data: Mapping[str, Any], mi: Mapping[str, Any],
    weights: list[float], student: Mapping[str, Any], evaluations: Mapping[str, Mapping], attack: Any, stages: Mapping[str, Mapping],
    seconds: float, audit_key: str, out: str | None = None, scan: Mapping[str, Mapping] | None = None,
) -> dict[str, Any]:
    """Assemble ``results.json`` (see the module docstring) and the gate's verdict."""
    from mimic.gate import judge

    probe = primary_probe(cfg.evaluate.probe)
    t, s = evaluations.get("teacher"), evaluations.get("student")
    res: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": kind,
        "audit_key": audit_key,
        "teacher_ca": _pick(t, probe, "ca"),
        "teacher_asr": _pick(t, probe, "asr"),
        "student_ca": _pick(s, probe, "ca"),
        "student_asr": _pick(s, probe, "asr"),
        "teacher_pl1": (scan or {}).get("teacher", {}).get("pl1"),
        "student_pl1": (scan or {}).get("student", {}).get("pl1"),
    }
    if "clean" in evaluations:
        res["clean_ca"] = _pick(evaluations["clean"], probe, "ca")
        res["clean_asr"] = _pick(evaluations["clean"], probe, "asr")
    res.update({
        "probe": probe,
        "probes": {who: dict(e["probes"]) for who, e in evaluations.items()},
        "worst_case": worst_case(evaluations),
        "target_class": attack.target if attack.known else None,
        "trigger": {"source": attack.source if attack.known else None, "id": attack.trigger_id},
        "asr_trigger": {who: (attack.source if attack.known else None) for who in evaluations},
        "scan": {who: dict(rec) for who, rec in (scan or {}).items()},
        "mi": dict(mi["mi"]),
        "weights": {k: float(w) for k, w in zip(mi["stages"], weights)},
        "mi_network": mi["network"],
        "teacher": dict(teacher),
        "student": dict(student),
        "data": dict(data),
        "stages": {k: dict(v) for k, v in stages.items()},
        "cached": {k: bool(v["cached"]) for k, v in stages.items()},
        "stage_seconds": {k: float(v["seconds"]) for k, v in stages.items()},
        "seconds": round(seconds, 2),
        "environment": environment(cfg.device, cfg.seed),
        "config": cfg.to_dict(),
    })
    if out is not None:
        res["out"] = out
    w = res["worst_case"]
    res["verdict"] = judge(w.get("teacher_ca"), w.get("student_ca"), w.get("student_asr"), cfg.gate, scan=res["scan"],
                           asr_trigger=res["trigger"]["source"], target=res["target_class"],
                           asr_probe=w.get("asr_probe"), ca_probe=w.get("ca_probe")).to_dict()
    return res
