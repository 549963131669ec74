"""Calibration of ``mimic scan``: a zoo of clean and backdoored encoders (and their MIMIC students).

    nice -n 10 .venv/bin/python benchmarks/bench_scan.py [--scale zoo4|bench|small|demo] [--clean 10] [--backdoored 10]
        [--data synthetic] [--cache runs/bench-scan/cache] [--json bench-results/scan.json] [--threads 2]
        [--set scan.KEY=VALUE ...] [--budget]

The zoo is made with the project's own stages (SimCLR ``pretrain``, BadEncoder ``attack``, ``mi`` +
``distill`` for the students, ``evaluate``, ``scan``) in one stage cache, so a rerun reuses every
encoder and scan already made (only new or changed ones are computed):

* clean encoder ``i``: SimCLR with seed ``i``;
* backdoored encoder ``i``: BadEncoder on clean encoder ``i`` with the trigger of ``ZOO[i]`` (sizes
  3-10 px, corners, centre, a random place per image, white / coloured / noise patterns, a blended
  full-image trigger) and target class ``ZOO[i]``'s; its CA/ASR is measured with the true trigger;
* student ``i``: the MIMIC student of backdoored encoder ``i`` (CA/ASR with the true trigger).

Every encoder is scanned with the same params. The table prints PL1 per model; the summary gives
the ROC AUC clean-vs-backdoored (score: -PL1), the TPR at 5% FPR, the threshold chosen (the
largest TPR at FPR <= 5% on the clean encoders, midway between the two PL1 values it separates),
the share of students flagged at that threshold next to the clean encoders' share, and seconds per
scan (scans computed in this run). ``--budget`` also times one scan of a width-8 and one of a
width-64 (full-width) CIFAR ResNet-18 on 2,000 images (point 4 of issue 13).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import docblock  # benchmarks/docblock.py, next to this file
import torch

from mimic.cache import StageCache
from mimic.config import Config, load_config
from mimic.inputs import clean_subset, clean_version, load_data, load_teacher, resolve_attack
from mimic.io import write_json
from mimic.results import environment
from mimic.stages.attack import plan_attack
from mimic.stages.distill import plan_distill
from mimic.stages.evaluate import plan_evaluate
from mimic.stages.mi import plan_mi, weights_of
from mimic.stages.pretrain import plan_pretrain
from mimic.stages.scan import plan_scan, scan_record

# the profile tiny's short search undone (zoo4 starts from that profile): the search mimic/defaults.yaml ships
SHIPPED_SEARCH = [f"scan.{k}={v}" for k, v in load_config().to_dict()["scan"].items() if k != "threshold"]
FAST_SEARCH = ["scan.steps=120", "scan.grid=2", "scan.probe_steps=30", "scan.stop_patience=40"]  # tests/test_scan.py

SCALES: dict[str, list[str]] = {
    # CPU scale of the zoo: width-8 encoders on the synthetic textures (~10 min per backdoored model with its
    # student on 2 idle cores)
    "small": ["data.synthetic_train=3000", "data.synthetic_test=1000", "data.clean_size=500", "encoder.width=8",
              "pretrain.epochs=4", "attack.shadow_size=1000", "attack.epochs=6", "mi.epochs=30", "distill.epochs=20",
              "evaluate.epochs=50", "evaluate.train_size=2000"],
    # the test bench's scale (tests/conftest.py ZOO_SETS) on the 10-class textures: width-4 encoders, ~1 min per
    # backdoored model with its student on 2 cores; the scan itself at the tests' shorter search
    "bench": ["data.synthetic_train=1000", "data.synthetic_test=400", "data.clean_size=200", "encoder.width=4",
              "pretrain.epochs=6", "pretrain.lr=0.01", "pretrain.batch_size=64", "attack.shadow_size=300",
              "attack.epochs=5", "attack.batch_size=32", "mi.epochs=10", "distill.epochs=20", "distill.batch_size=64",
              "evaluate.epochs=30", "evaluate.probe=linear", "evaluate.zscore=false", "scan.steps=120", "scan.grid=2",
              "scan.probe_steps=30", "scan.stop_patience=40"],
    # the fast suite's attack bench (tests/conftest.py ZooBench) with a new seed per model: 4 texture classes
    # (400 train / 200 test, written by this script as an NPZ), width-4 encoders, 20-epoch BadEncoder attacks (the
    # suite's 5 epochs implant only the 10x10 patch), and the shipped search; seconds per model
    "zoo4": ["profile=tiny", "encoder.width=4", "pretrain.epochs=6", "pretrain.lr=0.01", "pretrain.batch_size=64",
             "attack.epochs=20", "attack.batch_size=32", "attack.shadow_size=200", "data.clean_size=160",
             "evaluate.epochs=30", "evaluate.probe=linear", "evaluate.zscore=false", "distill.epochs=20",
             "precision=fp32", *SHIPPED_SEARCH],
}
SCALES["zoo4-fast"] = [*SCALES["zoo4"], *FAST_SEARCH]  # the same zoo, the tests' shorter search
SCALES.update({
    # the demo's scale (mimic/defaults.yaml)
    "demo": [],
})
CLASSES = {"zoo4": 4, "zoo4-fast": 4}  # scales on their own NPZ of synthetic textures with this many classes (else 10)


@dataclass(frozen=True)
class Backdoor:
    size: int
    position: str
    pattern: str
    colour: str = "white"
    alpha: float = 1.0
    target: int = 0

    def sets(self) -> list[str]:
        return [f"attack.trigger_size={self.size}", f"attack.trigger_position={self.position}",
                f"attack.trigger_pattern={self.pattern}", f"attack.trigger_colour={self.colour}",
                f"attack.trigger_alpha={self.alpha}", f"attack.target_class={self.target}"]

    def label(self) -> str:
        if self.position == "full":
            return f"blend {self.pattern} a={self.alpha:g}"
        pat = self.colour if self.pattern == "colour" else self.pattern
        return f"{self.size}px {pat} {self.position}"


ZOO = (
    Backdoor(10, "bottom_right", "white", target=0),
    Backdoor(3, "bottom_right", "white", target=1),
    Backdoor(5, "top_left", "colour", "red", target=2),
    Backdoor(8, "centre", "noise", target=3),
    Backdoor(6, "bottom_left", "colour", "green", target=4),
    Backdoor(4, "random", "white", target=5),
    Backdoor(32, "full", "noise", alpha=0.2, target=6),
    Backdoor(7, "top_right", "colour", "yellow", target=7),
    Backdoor(10, "random", "noise", target=8),
    Backdoor(5, "centre", "white", target=9),
    Backdoor(3, "top_left", "noise", target=1),
    Backdoor(32, "full", "noise", alpha=0.1, target=3),
)


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney form of the ROC AUC."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def choose_threshold(backdoored: list[float], clean: list[float], max_fpr: float = 0.05) -> tuple[float, float, float]:
    """(threshold, TPR, FPR) on PL1 (suspicious when PL1 < threshold): the largest TPR with FPR <= ``max_fpr``,
    the threshold midway between the last value flagged and the next value."""
    values = sorted(set(backdoored + clean))
    best = (values[0] / 2, 0.0, 0.0)
    for i, v in enumerate(values):
        nxt = values[i + 1] if i + 1 < len(values) else v * 1.1
        t = (v + nxt) / 2
        tpr = sum(p < t for p in backdoored) / len(backdoored)
        fpr = sum(p < t for p in clean) / len(clean)
        if fpr <= max_fpr and tpr > best[1]:
            best = (t, tpr, fpr)
    return best


def model_config(args: argparse.Namespace, seed: int, extra: list[str] = ()) -> Config:
    sets = [s for s in SCALES[args.scale] if not s.startswith("profile=")]
    profile = next((s.split("=", 1)[1] for s in SCALES[args.scale] if s.startswith("profile=")), None)
    return load_config(profile=profile, sets=[f"seed={seed}", f"data.source={args.data}", *sets, *extra, *args.sets])


def write_textures(path: Path, classes: int, n_train: int = 400, n_test: int = 200) -> str:
    """The zoo's fixed dataset: ``classes`` synthetic texture classes as a CIFAR-layout NPZ (as tests/conftest.py)."""
    import numpy as np

    from mimic.synthetic import make_synthetic

    if not path.exists():
        (xtr, ytr), (xte, yte) = make_synthetic(n_train, 0, classes), make_synthetic(n_test, 1, classes)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return str(path)


def scan_of(cfg: Config, name: str, enc_path: Path, fp: str, cache: StageCache, rows: list, kind: str, info: dict) -> dict:
    ds = load_data(cfg)
    clean = clean_subset(cfg, ds)
    run = plan_scan(cfg, name, load_teacher(enc_path), fp, clean, clean_version(clean), progress=False).run(cache)
    rec = scan_record(run, cfg.scan.threshold)
    row = {"model": name, "kind": kind, "fingerprint": fp[:12], "pl1": rec["pl1"], "similarity": rec["similarity"],
           "clean_similarity": rec["clean_similarity"], "target_class": rec["target_class"], "reached": rec["reached"],
           "scan_seconds": run.manifest.get("seconds"), "scan_cached": run.cached, **info}
    rows.append(row)
    print(f"{name:>14} {kind:>10} PL1 {rec['pl1']:.4f}  S {rec['similarity']:.3f} (clean {rec['clean_similarity']:.3f})  "
          f"collapse class {rec['target_class']}  {info.get('trigger', '')}  CA {info.get('ca', '-')} ASR {info.get('asr', '-')}"
          f"  [{'cached' if run.cached else f'{run.seconds:.0f} s'}]", flush=True)
    return row


def ca_asr(cfg: Config, name: str, enc, fp: str, ds, attack, cache: StageCache) -> dict:
    m = plan_evaluate(cfg, name, enc, fp, ds, attack).run(cache).manifest["probes"]
    r = next(iter(m.values()))
    return {"ca": r["ca"], "asr": r["asr"]}


def build_and_scan(args: argparse.Namespace, cache: StageCache) -> list[dict]:
    rows: list[dict] = []
    for i in range(max(args.clean, args.backdoored)):
        cfg = model_config(args, i)
        ds = load_data(cfg)
        pre = plan_pretrain(cfg, ds, progress=False).run(cache)
        clean_enc = load_teacher(pre.path("encoder"))
        if i < args.clean:
            scan_of(cfg, f"clean-{i}", pre.path("encoder"), pre.manifest["fingerprint"], cache, rows, "clean",
                    ca_asr(cfg, f"clean-{i}", clean_enc, pre.manifest["fingerprint"], ds, resolve_attack(None), cache))
        if i >= args.backdoored:
            continue
        bd = ZOO[i % len(ZOO)]
        bd = Backdoor(**{**bd.__dict__, "target": bd.target % CLASSES.get(args.scale, 10)})
        acfg = model_config(args, i, bd.sets())
        att = plan_attack(acfg, clean_enc, ds, progress=False).run(cache)
        teacher = load_teacher(att.path("encoder"))
        attack = resolve_attack(teacher)
        tfp = att.manifest["fingerprint"]
        info = {"trigger": bd.label(), "true_target": bd.target, **ca_asr(acfg, f"backdoored-{i}", teacher, tfp, ds, attack, cache)}
        scan_of(acfg, f"backdoored-{i}", att.path("encoder"), tfp, cache, rows, "backdoored", info)
        if args.students:
            clean = clean_subset(acfg, ds)
            ver = clean_version(clean)
            mi = plan_mi(acfg, teacher, tfp, clean, ver).run(cache)
            dist = plan_distill(acfg, teacher, tfp, clean, ver, weights_of(mi), progress=False).run(cache)
            sfp = dist.manifest["fingerprint"]
            student = load_teacher(dist.path("student"))
            sinfo = {"trigger": bd.label(), "true_target": bd.target, "teacher": f"backdoored-{i}",
                     **ca_asr(acfg, f"student-{i}", student, sfp, ds, attack, cache)}
            scan_of(acfg, f"student-{i}", dist.path("student"), sfp, cache, rows, "student", sinfo)
    return rows


def summarise(rows: list[dict]) -> dict:
    pl1 = {k: [r["pl1"] for r in rows if r["kind"] == k] for k in ("clean", "backdoored", "student")}
    out: dict = {"n": {k: len(v) for k, v in pl1.items()}}
    if pl1["clean"] and pl1["backdoored"]:
        t, tpr, fpr = choose_threshold(pl1["backdoored"], pl1["clean"])
        out.update({"auc": roc_auc([-p for p in pl1["backdoored"]], [-p for p in pl1["clean"]]), "threshold": round(t, 4),
                    "tpr_at_5pct_fpr": tpr, "fpr": fpr})
        if pl1["student"]:
            out["students_flagged"] = sum(p < t for p in pl1["student"]) / len(pl1["student"])
        out["clean_flagged"] = fpr
    implanted = [r["pl1"] for r in rows if r["kind"] == "backdoored" and (r.get("asr") or 0) >= IMPLANTED_ASR]
    out["n"]["implanted"] = len(implanted)
    if implanted and pl1["clean"]:  # the backdoors that took: true-trigger ASR >= IMPLANTED_ASR
        out["auc_implanted"] = roc_auc([-p for p in implanted], [-p for p in pl1["clean"]])
        out["tpr_implanted"] = sum(p < out["threshold"] for p in implanted) / len(implanted)
    for k, v in pl1.items():
        if v:
            out[f"pl1_{k}"] = {"min": min(v), "median": statistics.median(v), "max": max(v)}
    secs = [r["scan_seconds"] for r in rows if not r["scan_cached"] and r["scan_seconds"]]
    all_secs = [r["scan_seconds"] for r in rows if r["scan_seconds"]]
    out["seconds_per_scan"] = {"this_run": statistics.mean(secs) if secs else None,
                               "all": statistics.mean(all_secs) if all_secs else None}
    return out


IMPLANTED_ASR = 50.0  # a backdoored model counts as implanted when its true trigger reaches this ASR (%)
BEGIN, END = "<!-- scan-calibration:begin -->", "<!-- scan-calibration:end -->"


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def render(reports: list[tuple[str, dict]]) -> str:
    """The calibration block of docs/scan.md: one summary row per result JSON, then the first one's models."""
    lines = ["| run | clean / backdoored (implanted) / students | ROC AUC | AUC, implanted only | threshold | "
             "TPR at 5 % FPR (implanted) | clean flagged | students flagged | s per scan |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rep in reports:
        s, n = rep["summary"], rep["summary"]["n"]
        lines.append(f"| {name} | {n['clean']} / {n['backdoored']} ({n.get('implanted', '–')}) / {n['student']} | "
                     f"{_f(s.get('auc'), '.2f')} | {_f(s.get('auc_implanted'), '.2f')} | {_f(s.get('threshold'), '.4f')} | "
                     f"{_f(s.get('tpr_at_5pct_fpr'), '.2f')} ({_f(s.get('tpr_implanted'), '.2f')}) | "
                     f"{_f(s.get('clean_flagged'), '.2f')} | {_f(s.get('students_flagged'), '.2f')} | "
                     f"{_f(s['seconds_per_scan'].get('all'), '.0f')} |")
    name, rep = reports[0]
    thr = rep["summary"].get("threshold")
    lines += ["", f"Models of `{name}` (PL1 below {_f(thr, '.4f')}: flagged; CA/ASR: linear probe, ASR with the true "
              "trigger; S: the similarity the inverted trigger reached, S0 the clean images'):", "",
              "| model | trigger (target) | CA | ASR | PL1 | S (S0) | flagged |", "|---|---|---:|---:|---:|---:|:-:|"]
    for r in rep["rows"]:
        trig = f"{r['trigger']} ({r['true_target']})" if r.get("trigger") else "–"
        lines.append(f"| {r['model']} | {trig} | {_f(r.get('ca'), '.1f')} | {_f(r.get('asr'), '.1f')} | {r['pl1']:.4f} | "
                     f"{r['similarity']:.3f} ({r['clean_similarity']:.3f}) | {'yes' if thr and r['pl1'] < thr else ''} |")
    return "\n".join(lines)


def replace_block(path: Path, text: str) -> None:
    """Put ``text`` between this page's BEGIN/END markers of ``path``."""
    docblock.replace_block(path, BEGIN, END, text)


def budget(args: argparse.Namespace) -> list[dict]:
    """Seconds of one scan of a width-8 and a width-64 CIFAR ResNet-18 (random weights) on 2,000 images."""
    from mimic.data import ImageSet
    from mimic.encoders import EncoderSpec, build_encoder
    from mimic.runtime import seed_torch
    from mimic.scan import invert_trigger
    from mimic.stages.scan import settings_of

    cfg = load_config(sets=list(args.sets))
    g = torch.Generator().manual_seed(0)
    images = ImageSet(torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8, generator=g))
    out = []
    for width in args.budget_widths:
        seed_torch(0, "bench-scan", width)
        enc = build_encoder(EncoderSpec(width=width)).eval()
        t0 = time.perf_counter()
        res = invert_trigger(enc, images, settings_of(cfg.scan), seed=0, progress=not args.quiet)
        sec = time.perf_counter() - t0
        out.append({"width": width, "images": len(images), "steps": res.steps, "batch_size": cfg.scan.batch_size,
                    "seconds": round(sec, 1), "pl1": res.pl1})
        print(f"budget: width {width}: {sec:.1f} s for {res.steps} steps x {cfg.scan.batch_size} images "
              f"(+ two passes over {len(images)} images)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="small")
    p.add_argument("--data", default="synthetic", help="dataset the zoo is trained on (default: the synthetic textures)")
    p.add_argument("--clean", type=int, default=10, help="clean encoders (seeds 0..N-1)")
    p.add_argument("--backdoored", type=int, default=10, help=f"backdoored encoders (triggers from a list of {len(ZOO)})")
    p.add_argument("--no-students", dest="students", action="store_false", help="skip the MIMIC students")
    p.add_argument("--cache", default="runs/bench-scan/cache")
    p.add_argument("--json", default="bench-results/scan.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="e.g. scan.steps=400")
    p.add_argument("--budget", action="store_true", help="also time width-8 and full-width scans on 2,000 images")
    p.add_argument("--budget-only", action="store_true")
    p.add_argument("--budget-widths", type=int, nargs="+", default=[8, 64])
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--doc", type=Path, help="write the calibration table into this file's scan-calibration block")
    p.add_argument("--from-json", nargs="+", metavar="NAME=JSON", help="render --doc from these result files "
                   "(computes nothing); the first one's models are listed")
    args = p.parse_args()
    if args.from_json:
        if not args.doc:
            p.error("--from-json needs --doc")
        reps = [(n, json.loads(Path(f).read_text())) for n, _, f in (x.rpartition("=") for x in args.from_json)]
        reps = [(n, {**r, "summary": {**r["summary"], **summarise(r["rows"])}}) for n, r in reps]  # same summary code
        replace_block(args.doc, render(reps))
        print(f"wrote the calibration block of {args.doc}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scale in CLASSES and args.data == "synthetic":
        args.data = write_textures(Path(args.cache) / f"textures-{CLASSES[args.scale]}.npz", CLASSES[args.scale])
    t0 = time.perf_counter()
    report: dict = {"scale": args.scale, "data": args.data, "sets": args.sets, "zoo": [b.__dict__ for b in ZOO],
                    "load_average_start": os.getloadavg()}
    if not args.budget_only:
        rows = build_and_scan(args, StageCache(args.cache))
        report["rows"] = rows
        report["summary"] = summarise(rows)
        s = report["summary"]
        print(json.dumps(s, indent=1))
    if args.budget or args.budget_only:
        report["budget"] = budget(args)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_end"] = os.getloadavg()
    report["environment"] = environment("cpu", 0)
    report["scan_params"] = load_config(sets=list(args.sets)).to_dict()["scan"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report)
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    if args.doc and "summary" in report:
        replace_block(args.doc, render([(f"--scale {args.scale}", report)]))


if __name__ == "__main__":
    main()
