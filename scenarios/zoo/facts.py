"""The facts of the attack-zoo matrix, read from the files its DVC stages wrote.

Every value that ``docs/results.md`` shows comes from here: ``metrics/<key>.json`` (CA/ASR per
probe, one file per ``evaluate`` stage), ``records/*.json`` (stage records: seconds, environment),
``params.yaml`` with the profile of ``profile.yaml``, and the matrix's spec in ``matrix.py``, which
says what each evaluate key is (attack, defence, seed) and what every label reads. Nothing is
typed by hand; the prose lives in ``results.md.j2``.

An evaluate key is the name of an ``evaluate@<key>`` stage: :func:`index` asks ``matrix.targets``
for the evaluate stage of every (attack, defence, seed) the spec declares and checks each against
the ``evaluate_cells`` items that ``matrix.cells`` generates (the items of ``cells.yaml``).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matrix  # the spec beside this file (report.py runs as a script from this folder)

HERE = Path(__file__).resolve().parent

DVCFILE = "scenarios/zoo/dvc.yaml"  # as run from the repository root
PROBES = ("linear", "mlp", "linear_z", "mlp_z")  # the order of the tables; other probes follow
STANDARD = ("linear", "mlp")  # raw L2-normalised features: always tabled once anything ran
PROBE_TITLES = {"linear": "linear probe on raw L2-normalised features (the standard)",
                "mlp": "MLP probe on raw L2-normalised features (the standard)",
                "linear_z": "linear probe on z-scored features", "mlp_z": "MLP probe on z-scored features"}
ZSCORED = {"linear_z": "linear", "mlp_z": "mlp"}  # z-scored probe -> its standard counterpart
Z_GAP = 5.0  # points: a z-scored probe's ASR further than this from the standard one is reported
ANCHOR = "mimic"  # the defence the others are compared with (the first one run when it has not)
ASR_WORKS = 95.0  # %: a teacher's backdoor counts as working at this mean ASR or more (issue 17) ...
CA_KEPT = 3.0  # ... with its mean CA at most this many points under its clean encoder's
WEIGHTINGS = ("uniform", "sharp")  # MIMIC variants that differ from it only in the stage weights (issue 17, 3b)
SURVIVES = 10.0  # points: a defence leaves the backdoor in when its mean ASR exceeds the clean encoder's by more


def load(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing or not JSON."""
    from mimic.io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def defences_of(attack: str) -> list[str]:
    """The rows of an attack, in the spec's order: the references, then the defences run on it."""
    return [*matrix.REFERENCES, *(d for d, spec in matrix.DEFENCES.items() if matrix.applies(spec, attack))]


def label(defence: str) -> str:
    """A defence's (or reference's) label from the spec."""
    return matrix.REFERENCES[defence] if defence in matrix.REFERENCES else matrix.DEFENCES[defence].label


def index() -> dict[str, tuple[str, str, int]]:
    """Evaluate key -> (attack, defence, seed), for every evaluate stage the spec declares.

    The key is what ``matrix.targets`` names the stage (``<dvcfile>:evaluate@<key>``); it must be an
    ``evaluate_cells`` item of ``matrix.cells()`` for that attack's cell at that seed, and every item
    must be reached, else the spec and this report disagree (a ``RuntimeError``)."""
    items = matrix.cells()["evaluate_cells"]
    out: dict[str, tuple[str, str, int]] = {}
    for a in matrix.ATTACKS:
        for d in defences_of(a):
            for s in matrix.SEEDS:
                for target in matrix.targets([a], [d], [s], ""):
                    key = target.split("evaluate@", 1)[1]
                    item = items.get(key)
                    if item is None or item["cell"] != matrix.cell(a, s) or item["seed"] != s:
                        raise RuntimeError(f"evaluate key {key!r} is not the matrix's cell {matrix.cell(a, s)}")
                    out[key] = (a, d, s)
    if set(out) != set(items):
        raise RuntimeError(f"evaluate cells outside the spec: {', '.join(sorted(set(items) - set(out)))}")
    return out


def cells_stale(root: Path) -> bool:
    """True when ``root/cells.yaml`` (what DVC ran) holds other evaluate cells than the spec gives."""
    import yaml

    path = root / "cells.yaml"
    if not path.exists():
        return False
    try:
        ran = (yaml.safe_load(path.read_text()) or {}).get("evaluate_cells")
    except yaml.YAMLError:
        return True
    return ran != matrix.cells()["evaluate_cells"]


def read_metrics(root: Path, idx: dict[str, tuple[str, str, int]]) -> dict[str, Any]:
    """Every ``metrics/*.json``: ``values`` {key: {probe: {"ca", "asr"}}}, ``targets`` {key: class},
    ``unknown`` (files named after no evaluate key of the spec) and ``bad`` (unreadable files or ones
    that hold no CA/ASR for their key). Keys other than CA/ASR (seconds, environment) are ignored."""
    values: dict[str, dict[str, dict[str, float]]] = {}
    targets: dict[str, Any] = {}
    unknown, bad = [], []
    for f in sorted((root / "metrics").glob("*.json")):
        if f.stem not in idx:
            unknown.append(f.name)
            continue
        m = load(f)
        enc = m.get("encoders", {}).get(f.stem) if isinstance(m, dict) and isinstance(m.get("encoders"), dict) else None
        probes = {q: {"ca": float(v["ca"]), "asr": float(v["asr"])} for q, v in (enc or {}).items()
                  if isinstance(v, dict) and isinstance(v.get("ca"), (int, float)) and isinstance(v.get("asr"), (int, float))}
        if not probes:
            bad.append(f.name)
            continue
        values[f.stem] = probes
        targets[f.stem] = m.get("target_class")
    return {"values": values, "targets": targets, "unknown": unknown, "bad": bad}


def stats(xs: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None below two values) of ``xs``."""
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


def probes_present(values: dict[str, dict]) -> list[str]:
    """The probes to table: the standard ones once anything ran, the others when some file has them."""
    seen = {q for probes in values.values() for q in probes}
    if not seen:
        return []
    return [*STANDARD, *(q for q in PROBES if q in seen and q not in STANDARD), *sorted(seen - set(PROBES))]


def table(probe: str, attacks: list[str], idx: dict, values: dict) -> list[dict]:
    """One row per attack x defence of the attacks run: CA and ASR stats over the seeds present."""
    by = {(a, d, s): values[k].get(probe) for k, (a, d, s) in idx.items() if k in values}
    rows = []
    for a in attacks:
        for d in defences_of(a):
            pts = [(s, by[(a, d, s)]) for s in matrix.SEEDS if by.get((a, d, s))]
            rows.append({"attack": a, "defence": d, "reference": d in matrix.REFERENCES,
                         "seeds": [s for s, _ in pts], "missing": [s for s in matrix.SEEDS if s not in {s for s, _ in pts}],
                         "n": len(pts), "n_all": len(matrix.SEEDS),
                         "ca": stats([v["ca"] for _, v in pts]), "asr": stats([v["asr"] for _, v in pts]),
                         "points": [{"seed": s, "ca": v["ca"], "asr": v["asr"]} for s, v in pts]})
    return rows


def versus(x: dict, y: dict) -> dict[str, Any]:
    """``x`` against ``y`` (two stats): the difference of the means and the larger std; a tie when the
    difference is smaller than that std (None when neither has a std: one seed each)."""
    spread = max((s for s in (x["std"], y["std"]) if s is not None), default=None)
    diff = x["mean"] - y["mean"]
    return {"diff": diff, "spread": spread, "tie": None if spread is None else abs(diff) < spread}


def verdicts(rows: list[dict], attacks: list[str]) -> list[dict]:
    """Per attack (on one probe's rows): the defence with the lowest mean ASR and which defences tie
    with it, and every defence against the anchor (MIMIC, else the first defence run) on ASR and CA."""
    out = []
    for a in attacks:
        ds = [r for r in rows if r["attack"] == a and not r["reference"] and r["n"]]
        if not ds:
            continue
        low = min(ds, key=lambda r: r["asr"]["mean"])
        anchor = next((r for r in ds if r["defence"] == ANCHOR), ds[0])
        out.append({
            "attack": a, "lowest": low,
            "lowest_ties": [r["defence"] for r in ds if r is not low and versus(r["asr"], low["asr"])["tie"]],
            "anchor": anchor,
            "against": [{"defence": r["defence"], "asr": versus(r["asr"], anchor["asr"]), "ca": versus(r["ca"], anchor["ca"])}
                        for r in ds if r is not anchor],
        })
    return out


def _row(rows: list[dict], attack: str, defence: str) -> dict | None:
    return next((r for r in rows if r["attack"] == attack and r["defence"] == defence and r["n"]), None)


def teachers(rows: list[dict], attacks: list[str]) -> list[dict]:
    """Per attack (on one probe's rows): did its teacher's backdoor work (mean ASR >= ASR_WORKS) at a
    CA kept within CA_KEPT points of the clean encoder's? ``ca_ok`` is None while the clean row is missing."""
    out = []
    for a in attacks:
        t, c = _row(rows, a, "teacher"), _row(rows, a, "clean")
        if t is None:
            continue
        drop = None if c is None else c["ca"]["mean"] - t["ca"]["mean"]
        out.append({"attack": a, "asr": t["asr"], "ca": t["ca"], "clean_ca": None if c is None else c["ca"], "drop": drop,
                    "asr_ok": t["asr"]["mean"] >= ASR_WORKS, "ca_ok": None if drop is None else drop <= CA_KEPT})
    return out


def losses(rows: list[dict], attacks: list[str], defence: str = ANCHOR) -> list[dict]:
    """Per attack where ``defence`` ran (on one probe's rows): whether it leaves the backdoor in (mean ASR
    more than SURVIVES points over the clean encoder's, the trigger's base rate) and which defences reach a
    lower ASR than it beyond the spread (``beaten_by``) or on one seed each, where no call is made (``unsure``)."""
    out = []
    for a in attacks:
        m, c = _row(rows, a, defence), _row(rows, a, "clean")
        if m is None:
            continue
        beaten, unsure = [], []
        for r in rows:
            if r["attack"] != a or r["reference"] or not r["n"] or r["defence"] == defence:
                continue
            v = versus(r["asr"], m["asr"])
            if v["diff"] < 0 and v["tie"] is False:
                beaten.append({"defence": r["defence"], "asr": r["asr"], "ca": r["ca"], "diff": v["diff"]})
            elif v["diff"] < 0 and v["tie"] is None:
                unsure.append({"defence": r["defence"], "asr": r["asr"], "ca": r["ca"], "diff": v["diff"]})
        excess = None if c is None else m["asr"]["mean"] - c["asr"]["mean"]
        out.append({"attack": a, "row": m, "clean_asr": None if c is None else c["asr"], "excess": excess,
                    "survives": None if excess is None else excess > SURVIVES, "beaten_by": beaten, "unsure": unsure})
    return out


def mi_spans(root: Path) -> list[dict]:
    """Per MI mapping (``mi/*/mi.json``): the ratio of the largest to the smallest stage weight, its range
    over the MI stages that ran."""
    ratios: dict[str, list[float]] = {}
    for f in sorted((root / "mi").glob("*/mi.json")):
        d = load(f)
        w = d.get("weights") if isinstance(d, dict) else None
        if not isinstance(w, dict) or not w or min(float(v) for v in w.values()) <= 0:
            continue
        vals = [float(v) for v in w.values()]
        ratios.setdefault(str(d.get("mapping", "?")), []).append(max(vals) / min(vals))
    return [{"mapping": m, "n": len(r), "low": min(r), "high": max(r)} for m, r in sorted(ratios.items())]


def weighting(tables: dict[str, list[dict]], attacks: list[str]) -> dict[str, Any]:
    """Does the MI part matter? Per standard probe, each weighting variant against the anchor: the attacks
    where its mean ASR (and CA) is lower or higher beyond the larger std, tied, or on one seed each (no call).
    ``keep`` names the variants that beat the anchor's ASR beyond the spread on more than half the attacks
    compared, on every standard probe, and never cost CA beyond the spread; the rest are not kept."""
    rows, keep = [], []
    for d in WEIGHTINGS:
        good = True
        seen = False
        for q in STANDARD:
            if q not in tables:
                continue
            tally: dict[str, dict[str, list[str]]] = {k: {"lower": [], "tie": [], "higher": [], "nocall": []} for k in ("asr", "ca")}
            for a in attacks:
                m, r = _row(tables[q], a, ANCHOR), _row(tables[q], a, d)
                if m is None or r is None:
                    continue
                for k in ("asr", "ca"):
                    v = versus(r[k], m[k])
                    tally[k]["nocall" if v["tie"] is None else "tie" if v["tie"] else "lower" if v["diff"] < 0 else "higher"].append(a)
            n = sum(len(x) for x in tally["asr"].values())
            if not n:
                continue
            seen = True
            rows.append({"probe": q, "defence": d, "n": n, **tally})
            good = good and len(tally["asr"]["lower"]) > n / 2 and not tally["ca"]["lower"]
        if seen and good:
            keep.append(d)
    return {"rows": rows, "keep": keep}


def zscore_gaps(tables: dict[str, list[dict]]) -> list[dict]:
    """Rows where a z-scored probe's mean ASR differs from its standard probe's by more than Z_GAP."""
    out = []
    for zq, base in ZSCORED.items():
        if zq not in tables or base not in tables:
            continue
        for z, b in zip(tables[zq], tables[base]):
            if z["n"] and b["n"] and abs(z["asr"]["mean"] - b["asr"]["mean"]) > Z_GAP:
                out.append({"attack": z["attack"], "defence": z["defence"], "probe": zq, "base": base,
                            "z": z["asr"]["mean"], "std": b["asr"]["mean"], "gap": z["asr"]["mean"] - b["asr"]["mean"]})
    return out


def not_run(idx: dict, values: dict) -> dict[str, Any]:
    """The evaluations without metrics: ``attacks`` wholly not run, and per partly run attack the
    defences with the seeds they lack."""
    missing: dict[str, dict[str, list[int]]] = {}
    for k, (a, d, s) in idx.items():
        if k not in values:
            missing.setdefault(a, {}).setdefault(d, []).append(s)
    whole = [a for a in matrix.ATTACKS if a in missing and sum(map(len, missing[a].values())) == sum(
        1 for v in idx.values() if v[0] == a)]
    part = [{"attack": a, "defences": [{"defence": d, "seeds": sorted(missing[a][d])} for d in defences_of(a) if d in missing[a]]}
            for a in matrix.ATTACKS if a in missing and a not in whole]
    return {"attacks": whole, "partial": part, "count": len(idx) - len(values)}


def setup(root: Path) -> dict[str, Any] | None:
    """The parameters the stages ran with: ``params.yaml`` under ``profile.yaml``'s profile."""
    import yaml

    from mimic.config import ConfigError, load_config

    prof = root / "profile.yaml"
    info = (yaml.safe_load(prof.read_text()) or {}) if prof.exists() else {}
    if not (root / "params.yaml").exists():
        return None
    try:
        cfg = load_config(root / "params.yaml", info.get("profile")).to_dict()
    except ConfigError:
        return None
    return {**cfg, "profile": info.get("profile"), "threads": info.get("threads")}


def compute(root: Path) -> dict[str, Any]:
    """Stage records (``records/*.json``) that ran (not cached): their count and wall time per stage
    kind, and the devices, threads and commits they record."""
    per: dict[str, dict[str, float]] = {}
    envs = []
    for f in sorted((root / "records").glob("*.json")):
        rec = load(f)
        if not isinstance(rec, dict) or rec.get("cached") or not isinstance(rec.get("seconds"), (int, float)):
            continue
        kind = str(rec.get("stage") or ("mi" if f.stem.startswith("mi-") else "?"))
        item = per.setdefault(kind, {"n": 0, "seconds": 0.0})
        item["n"] += 1
        item["seconds"] += float(rec["seconds"])
        envs.append(rec.get("environment") or {})
    return {"stages": [{"stage": k, **v} for k, v in sorted(per.items())],
            "hours": sum(v["seconds"] for v in per.values()) / 3600, "n": sum(v["n"] for v in per.values()),
            "devices": sorted({str(e["device"]) for e in envs if e.get("device")}),
            "threads": sorted({str(e["threads"]) for e in envs if e.get("threads") is not None}),
            "commits": sorted({str(e["git"])[:12] for e in envs if e.get("git")})}


def collect(root: Path = HERE) -> dict[str, Any]:
    """Everything the template and the plots need."""
    idx = index()
    m = read_metrics(root, idx)
    values = m["values"]
    attacks = [a for a in matrix.ATTACKS if any(idx[k][0] == a for k in values)]
    probes = probes_present(values)
    tables = {q: table(q, attacks, idx, values) for q in probes}
    targets = {a: sorted({str(m["targets"][k]) for k in values if idx[k][0] == a and m["targets"][k] is not None})
               for a in attacks}
    return {
        "attacks": attacks, "probes": probes, "tables": tables, "titles": PROBE_TITLES,
        "verdicts": {q: verdicts(tables[q], attacks) for q in probes},
        "teachers": {q: teachers(tables[q], attacks) for q in probes if q in STANDARD},
        "losses": {q: losses(tables[q], attacks) for q in probes if q in STANDARD},
        "weighting": weighting(tables, attacks), "mi_spans": mi_spans(root),
        "asr_works": ASR_WORKS, "ca_kept": CA_KEPT, "survives": SURVIVES, "anchor": ANCHOR, "zgaps": zscore_gaps(tables), "z_gap": Z_GAP,
        "not_run": not_run(idx, values), "n_evaluations": len(idx), "n_run": len(values),
        "unknown": m["unknown"], "bad": m["bad"], "stale": cells_stale(root), "targets": targets,
        "attack_labels": {a: s.label for a, s in matrix.ATTACKS.items()},
        "defence_labels": {d: label(d) for d in (*matrix.REFERENCES, *matrix.DEFENCES)},
        "references": list(matrix.REFERENCES), "seeds": list(matrix.SEEDS),
        "seeds_run": sorted({idx[k][2] for k in values}), "dvcfile": DVCFILE,
        "setup": setup(root), "compute": compute(root),
    }


def fmt(v: float | None, nd: int = 1) -> str:
    """A number with ``nd`` decimals, or an en dash for None."""
    return "–" if v is None else f"{v:.{nd}f}"


def ms(st: dict[str, Any]) -> str:
    """``mean ± std`` of a stats dict (the mean alone for one value, "not run" for none)."""
    if not st["n"]:
        return "not run"
    return fmt(st["mean"]) if st["std"] is None else f"{fmt(st['mean'])} ± {fmt(st['std'])}"


def seeds(ss: list[int]) -> str:
    """Seeds as the stage names spell them: ``s0, s2``."""
    return ", ".join(f"s{s}" for s in ss)
