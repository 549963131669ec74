"""The facts of the CIFAR-10 scenario, read from the files its DVC stages wrote.

Every value that ``docs/cifar10.md`` shows comes from here: ``metrics/*.json`` (CA/ASR per probe),
``records/*.json`` (stage records: seconds, environment, fingerprints), ``mi/*/mi.json``,
``params.yaml`` and ``dvc.lock`` (the commands as they ran). Nothing is typed by hand; the prose
lives in ``results.md.j2``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CIFAR = HERE / "../../../shared/data/cifar10.npz"

# (name, label, group); the order of the table
ROWS = [
    ("clean", "clean encoder (SimCLR, no attack)", "reference"),
    ("teacher", "teacher: BadEncoder (no defense)", "reference"),
    ("mimic", "**MIMIC** (MI on teacher, all terms, empty student)", "mimic"),
    ("finetune", "baseline: SimCLR fine-tuning of the teacher on D", "baseline"),
    ("plain", "baseline: plain distillation (clone loss only), empty student", "baseline"),
    ("teacher_init", "baseline: MIMIC loss, student initialised from the teacher", "baseline"),
    ("mi_student", "ablation: MI on the random student (authors' code)", "ablation"),
    ("uniform", "ablation: uniform stage weights", "ablation"),
    ("no_attention", "ablation: no attention term", "ablation"),
    ("no_clone", "ablation: no clone term", "ablation"),
    ("no_contrastive", "ablation: no contrastive term", "ablation"),
    ("clean500", "ablation: D = 500 images", "ablation"),
    ("clean1000", "ablation: D = 1,000 images", "ablation"),
]
LABELS = {name: label for name, label, _ in ROWS}
# which MI record a distillation's weights came from (None: the weights are not used)
MI_OF = {"mimic": "teacher", "teacher_init": "teacher", "mi_student": "student", "no_clone": "teacher",
         "no_contrastive": "teacher", "clean500": "clean500", "clean1000": "clean1000"}
PROBES = ("linear", "mlp")
MI_RECORDS = ("teacher", "student", "clean500", "clean1000")
# (scenario file, name under docs/img/cifar10)
IMAGES = [("mi/teacher/mi.png", "mi-teacher.png"), ("mi/student/mi.png", "mi-student.png"),
          ("distill/mimic/losses.png", "losses-mimic.png"), ("distill/plain/losses.png", "losses-plain.png"),
          ("distill/teacher_init/losses.png", "losses-teacher_init.png")]
TOLERANCE = 2.0  # points: an ablation differs from MIMIC only beyond this (one seed per variant)


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_size(data_path: Path = CIFAR) -> int | None:
    try:
        import numpy as np

        with np.load(data_path, mmap_mode="r") as z:
            return int(z["y_train"].shape[0])
    except (OSError, KeyError, ValueError):
        return None


def params(root: Path = HERE) -> dict:
    import yaml

    return yaml.safe_load((root / "params.yaml").read_text())


def lock_commands(root: Path = HERE) -> dict[str, str]:
    """Each stage's command as it ran, from ``dvc.lock`` (whitespace normalised)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: " ".join(st["cmd"].split()) if isinstance(st["cmd"], str) else " && ".join(st["cmd"])
            for name, st in stages.items()}


def _clean_size(name: str, p: dict, cmds: dict[str, str]) -> int | None:
    """|D| of a distillation: its command's ``--set data.clean_size=N``, else params.yaml's value."""
    cmd = cmds.get(f"distill@{name}")
    if cmd is None:
        return None
    m = re.search(r"data\.clean_size=(\d+)", cmd)
    return int(m.group(1)) if m else int(p["data"]["clean_size"])


def rows(root: Path = HERE) -> dict[str, dict]:
    """One row per encoder that has a metrics file: CA/ASR per probe, training/eval time, device, D."""
    p, cmds, n_train = params(root), lock_commands(root), train_size()
    out: dict[str, dict] = {}
    for name, label, group in ROWS:
        m = load(root / "metrics" / f"{name}.json")
        if m is None:
            continue
        probes = m["encoders"][name]
        rec = load(root / "records" / f"{name}.json") or {}
        mi_rec = load(root / "records" / f"mi-{MI_OF[name]}.json") if name in MI_OF else None
        ev = load(root / "records" / "eval" / f"{name}.json") or {}
        env = rec.get("environment") or ev.get("environment") or m.get("environment") or {}
        if group == "reference":
            d = None
        elif name == "finetune":
            d = rec.get("images")
        else:
            d = (rec.get("data") or {}).get("clean_images") or _clean_size(name, p, cmds)
        out[name] = {
            "name": name, "label": label, "group": group,
            **{f"ca_{q}": probes.get(q, {}).get("ca") for q in PROBES},
            **{f"asr_{q}": probes.get(q, {}).get("asr") for q in PROBES},
            "d_images": d, "d_pct": None if d is None or not n_train else 100.0 * d / n_train,
            "train_s": None if rec.get("cached") else rec.get("seconds"),
            "mi_s": (mi_rec or {}).get("seconds"), "eval_s": ev.get("seconds", m.get("seconds")),
            "device": env.get("device", "?") + (f" ({env['threads']} thr)" if env.get("threads") else ""),
        }
    return out


def acceptance(r: dict) -> list[dict]:
    """The scenario's acceptance criteria, per probe, from the numbers."""
    out = []
    c, t, s = r.get("clean"), r.get("teacher"), r.get("mimic")
    for q in PROBES:
        if c and t:
            gap = c[f"ca_{q}"] - t[f"ca_{q}"]
            out.append({"what": f"teacher ASR >= 95 % ({q} probe)", "probe": q, "who": "teacher",
                        "ok": t[f"asr_{q}"] is not None and t[f"asr_{q}"] >= 95.0, "value": f"{fmt(t[f'asr_{q}'])} %"})
            out.append({"what": f"teacher CA within 3 points of the clean encoder ({q})", "probe": q, "who": "teacher",
                        "ok": gap <= 3.0,
                        "value": f"{fmt(t[f'ca_{q}'])} vs {fmt(c[f'ca_{q}'])} (teacher - clean = {-gap:+.1f})"})
        if c and t and s:
            bound = max(5.0, c[f"asr_{q}"] + 2.0)
            gap = t[f"ca_{q}"] - s[f"ca_{q}"]
            out.append({"what": f"MIMIC student ASR <= max(5, clean ASR + 2) = {bound:.1f} % ({q})", "probe": q,
                        "who": "mimic", "ok": s[f"asr_{q}"] <= bound, "value": f"{fmt(s[f'asr_{q}'])} %"})
            out.append({"what": f"MIMIC student CA within 3 points of the teacher ({q})", "probe": q, "who": "mimic",
                        "ok": gap <= 3.0,
                        "value": f"{fmt(s[f'ca_{q}'])} vs {fmt(t[f'ca_{q}'])} (student - teacher = {-gap:+.1f})"})
    return out


def versus_baselines(r: dict) -> list[dict]:
    """Per baseline and probe: is MIMIC's ASR no higher and its CA loss no larger (no tolerance)?"""
    s, t = r.get("mimic"), r.get("teacher")
    out = []
    for name, label, group in ROWS:
        if group != "baseline":
            continue
        b = r.get(name)
        item: dict[str, Any] = {"name": name, "label": label, "run": b is not None, "probes": []}
        if b is not None and s and t:
            for q in PROBES:
                loss_s, loss_b = t[f"ca_{q}"] - s[f"ca_{q}"], t[f"ca_{q}"] - b[f"ca_{q}"]
                item["probes"].append({"probe": q, "asr_ok": s[f"asr_{q}"] <= b[f"asr_{q}"], "ca_ok": loss_s <= loss_b,
                                       "asr_s": s[f"asr_{q}"], "asr_b": b[f"asr_{q}"], "loss_s": loss_s, "loss_b": loss_b})
        item["better"] = item["run"] and bool(item["probes"]) and all(p["asr_ok"] and p["ca_ok"] for p in item["probes"])
        out.append(item)
    return out


def lowest_asr(r: dict) -> list[dict]:
    """Per probe: is MIMIC's ASR the lowest among MIMIC and the baselines that ran?"""
    s, t = r.get("mimic"), r.get("teacher")
    done = [r[n] for n, _, g in ROWS if g == "baseline" and n in r]
    if not (s and t and done):
        return []
    return [{"probe": q, "lowest": all(s[f"asr_{q}"] <= b[f"asr_{q}"] for b in done), "n": len(done),
             "asr": s[f"asr_{q}"], "others": [b[f"asr_{q}"] for b in done], "loss": t[f"ca_{q}"] - s[f"ca_{q}"]}
            for q in PROBES]


def ablations(r: dict) -> dict:
    """Ablations against MIMIC on the linear probe: worse by more than TOLERANCE points, or not."""
    s = r.get("mimic")
    abl = [r[n] for n, _, g in ROWS if g == "ablation" and n in r]
    if not (s and abl):
        return {"worse": [], "same": []}

    def worse(a: dict) -> bool:
        return a["asr_linear"] > s["asr_linear"] + TOLERANCE or a["ca_linear"] < s["ca_linear"] - TOLERANCE

    return {"worse": [a for a in abl if worse(a)], "same": [a for a in abl if not worse(a)]}


def mi_records(root: Path = HERE) -> list[dict]:
    out = []
    for who in MI_RECORDS:
        mi = load(root / "mi" / who / "mi.json")
        if mi:
            out.append({"who": who, "network": mi.get("network", who),
                        "clean": who[5:] if who.startswith("clean") else None,
                        "stages": [{"stage": s, "mi": mi["mi"][s], "weight": mi["weights"][s]} for s in mi["stages"]]})
    return out


def compute(root: Path = HERE) -> dict:
    """Per-stage wall times from the stage records and metrics files, and their sum."""
    items = []
    for f in sorted((root / "records").glob("*.json")):
        rec = load(f) or {}
        if rec.get("seconds") is None or rec.get("cached") or f.stem.startswith("reproduction"):
            continue
        if f.stem.startswith("mi-"):
            stage = f"mi@{f.stem[3:]}"
        else:
            stage = {"clean": "pretrain", "teacher": "attack", "finetune": "finetune"}.get(f.stem, f"distill@{f.stem}")
        items.append({"stage": stage, "seconds": float(rec["seconds"])})
    for f in sorted((root / "records" / "eval").glob("*.json")) or sorted((root / "metrics").glob("*.json")):
        m = load(f) or {}  # evaluate's seconds: records/eval/ (metrics files of older runs carried them)
        if m.get("seconds") is not None:
            items.append({"stage": f"evaluate@{f.stem}", "seconds": float(m["seconds"])})
    threads = sorted({str((load(f) or {}).get("environment", {}).get("threads")) for f in (root / "records").glob("*.json")}
                     - {"None"})
    return {"items": items, "total_h": sum(i["seconds"] for i in items) / 3600, "threads": threads}


def reproductions(root: Path = HERE) -> list[dict]:
    """``records/reproduction*.json``: `report.py compare` in a fresh clone after its `dvc repro`."""
    reps = [r for r in (load(f) for f in sorted((root / "records").glob("reproduction*.json"))) if r]
    for rep in reps:
        rep["differ"] = [f"{r['encoder']} {r['probe']} {r['metric'].upper()} {r['delta']:+.2f}"
                         for r in rep.get("rows", []) if r.get("delta")]
    return sorted(reps, key=lambda r: r.get("date", ""))


def runs(root: Path = HERE) -> dict[str, Any]:
    """How the numbers were made: the profile (``profile.yaml``), the devices and seeds the metrics
    files record, and the attacks the pipeline's commands ran (``dvc.lock``)."""
    import yaml

    envs = [(load(f) or {}).get("environment") or {}
            for f in sorted((root / "records" / "eval").glob("*.json")) or sorted((root / "metrics").glob("*.json"))]
    prof = root / "profile.yaml"
    profile = (yaml.safe_load(prof.read_text()) or {}).get("profile") if prof.exists() else None
    attacks = sorted({m for cmd in lock_commands(root).values() for m in re.findall(r"mimic attack (\w+)", cmd)})
    return {"profile": profile, "devices": sorted({str(e["device"]) for e in envs if e.get("device")}),
            "seeds": sorted({int(e["seed"]) for e in envs if e.get("seed") is not None}), "attacks": attacks,
            "gpu": any(str(e.get("device", "")).startswith("cuda") for e in envs)}


def mi_spread(root: Path = HERE) -> dict | None:
    mi = load(root / "mi" / "teacher" / "mi.json")
    if not mi:
        return None
    w = [float(v) for v in mi["weights"].values()]
    return {"min": min(w), "max": max(w), "ratio": max(w) / min(w)}


def collect(root: Path = HERE) -> dict[str, Any]:
    """Everything the template needs."""
    r = rows(root)
    p = params(root)
    acc = acceptance(r)
    lin = [a for a in acc if a["probe"] == "linear"]
    t = load(root / "metrics" / "teacher.json") or {}
    return {
        "rows": r, "order": [n for n, _, _ in ROWS], "labels": LABELS, "params": p, "gpu": (p.get("profiles") or {}).get("gpu", {}),
        "n_train": train_size(), "target": t.get("target_class"),
        "acceptance": acc, "attack_ok": all(a["ok"] for a in lin if a["who"] == "teacher"),
        "defense_ok": all(a["ok"] for a in lin if a["who"] == "mimic"), "all_linear_ok": all(a["ok"] for a in lin),
        "baselines": versus_baselines(r), "lowest": lowest_asr(r), "ablations": ablations(r), "tolerance": TOLERANCE,
        "mi": mi_records(root), "mi_spread": mi_spread(root), "compute": compute(root),
        "commands": lock_commands(root), "reproductions": reproductions(root), "runs": runs(root),
    }


def fmt(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def dur(s: float | None) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"
