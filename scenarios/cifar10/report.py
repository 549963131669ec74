"""CIFAR-10 reference scenario: stamp stage records, and write docs/results.md from the metrics.

    python report.py stamp FILE --params params.yaml --profile cpu   # add the environment to a JSON record
    python report.py write --out ../../docs/results.md --img ../../docs/img/cifar10
    python report.py compare --rev HEAD --tol 1 --json compare.json  # a rerun vs the committed numbers

Every number in docs/results.md is read from the JSON files the DVC stages wrote (metrics/*.json,
records/*.json, mi/*/mi.json); nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cmd_stamp(args: argparse.Namespace) -> None:
    """Add ``environment`` (device, threads, torch) to a JSON record that lacks it. The stage ran in
    another process, so its ``--threads`` is passed on to be recorded."""
    from mimic.config import load_config
    from mimic.pipeline import git_revision, write_json
    from mimic.runtime import environment, resolve_device

    cfg = load_config(args.params, args.profile)
    path = Path(args.file)
    rec = json.loads(path.read_text())
    if "environment" not in rec:
        env = environment(resolve_device(cfg.device))
        if args.threads:
            env["threads"] = args.threads
        rec["environment"] = {**env, "seed": cfg.seed, "git": git_revision()}
        write_json(path, rec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp")
    s.add_argument("file")
    s.add_argument("--params")
    s.add_argument("--profile")
    s.add_argument("--threads", type=int, help="the stage's --threads, so the record states what ran")
    s.add_argument("--quiet", action="store_true")
    w = sub.add_parser("write")
    w.add_argument("--out", default=str(HERE.parent.parent / "docs" / "results.md"))
    w.add_argument("--img", default=str(HERE.parent.parent / "docs" / "img" / "cifar10"))
    c = sub.add_parser("compare", help="compare the metrics in the working tree (a rerun) with those at a git revision")
    c.add_argument("--rev", default="HEAD", help="the revision holding the reference numbers (default HEAD)")
    c.add_argument("--tol", type=float, default=1.0, help="largest allowed |difference| in points (default 1)")
    c.add_argument("--dir", default=str(HERE), help="the scenario folder (default: this script's)")
    c.add_argument("--json", help="also write the comparison here")
    c.add_argument("--note", help="a sentence recorded with the comparison (shown in docs/results.md)")
    args = ap.parse_args(argv)
    if args.cmd == "stamp":
        cmd_stamp(args)
    elif args.cmd == "compare":
        return cmd_compare(args)
    else:
        cmd_write(args)
    return 0


# ---------------------------------------------------------------------------------------------
# docs/results.md

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
# which MI record a distillation's weights came from (None: the weights are not used)
MI_OF = {"mimic": "teacher", "teacher_init": "teacher", "mi_student": "student", "no_clone": "teacher",
         "no_contrastive": "teacher", "clean500": "clean500", "clean1000": "clean1000"}
PROBES = ("linear", "mlp")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v, nd: int = 1) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _dur(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _train_size(data_path: Path) -> int | None:
    try:
        import numpy as np

        with np.load(data_path, mmap_mode="r") as z:
            return int(z["y_train"].shape[0])
    except Exception:  # noqa: BLE001 - the table says "?" instead
        return None


def _params() -> dict:
    import yaml

    return yaml.safe_load((HERE / "params.yaml").read_text())


def _lock_cmds() -> dict[str, str]:
    import yaml

    lock = HERE / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: " ".join(st["cmd"].split()) if isinstance(st["cmd"], str) else " && ".join(st["cmd"])
            for name, st in stages.items()}


def _clean_size(name: str, params: dict, cmds: dict[str, str]) -> int | None:
    """|D| of a distillation: its command's `--set data.clean_size=N`, else params.yaml's value."""
    import re

    cmd = cmds.get(f"distill@{name}")
    if cmd is None:
        return None
    m = re.search(r"data\.clean_size=(\d+)", cmd)
    return int(m.group(1)) if m else int(params["data"]["clean_size"])


def collect() -> dict[str, dict]:
    """One row per encoder that has a metrics file: CA/ASR per probe, training/eval time, device, D."""
    params = _params()
    cmds = _lock_cmds()
    n_train = _train_size(HERE / "../../../shared/data/cifar10.npz")
    rows: dict[str, dict] = {}
    for name, label, group in ROWS:
        m = _load(HERE / "metrics" / f"{name}.json")
        if m is None:
            continue
        probes = m["encoders"][name]
        rec = _load(HERE / "records" / f"{name}.json") or {}
        mi_rec = _load(HERE / "records" / f"mi-{MI_OF[name]}.json") if name in MI_OF else None
        env = rec.get("environment") or m.get("environment") or {}
        if group == "reference":
            d_images = None
        elif name == "finetune":
            d_images = rec.get("images")
        else:
            d_images = (rec.get("data") or {}).get("clean_images") or _clean_size(name, params, cmds)
        train_s = rec.get("seconds")
        if rec.get("cached"):
            train_s = None
        rows[name] = {
            "label": label, "group": group,
            **{f"ca_{p}": probes.get(p, {}).get("ca") for p in PROBES},
            **{f"asr_{p}": probes.get(p, {}).get("asr") for p in PROBES},
            "d_images": d_images,
            "d_pct": None if d_images is None or not n_train else 100.0 * d_images / n_train,
            "train_s": train_s, "mi_s": (mi_rec or {}).get("seconds"), "eval_s": m.get("seconds"),
            "device": env.get("device", "?") + (f" ({env['threads']} thr)" if env.get("threads") else ""),
            "gpu": env.get("gpu"),
        }
    rows["_meta"] = {"n_train": n_train, "params": params, "target": None}
    t = _load(HERE / "metrics" / "teacher.json")
    if t:
        rows["_meta"]["target"] = t.get("target_class")
    return rows


def acceptance(rows: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's acceptance criteria, per probe, from the numbers."""
    out = []
    c, t, s = rows.get("clean"), rows.get("teacher"), rows.get("mimic")
    for p in PROBES:
        if c and t:
            ok_asr = t[f"asr_{p}"] is not None and t[f"asr_{p}"] >= 95.0
            gap = c[f"ca_{p}"] - t[f"ca_{p}"]
            out.append((f"teacher ASR >= 95 % ({p} probe)", ok_asr, f"{_fmt(t[f'asr_{p}'])} %"))
            out.append((f"teacher CA within 3 points of the clean encoder ({p})", gap <= 3.0,
                        f"{_fmt(t[f'ca_{p}'])} vs {_fmt(c[f'ca_{p}'])} (teacher - clean = {-gap:+.1f})"))
        if c and t and s:
            bound = max(5.0, c[f"asr_{p}"] + 2.0)
            out.append((f"MIMIC student ASR <= max(5, clean ASR + 2) = {bound:.1f} % ({p})", s[f"asr_{p}"] <= bound,
                        f"{_fmt(s[f'asr_{p}'])} %"))
            gap = t[f"ca_{p}"] - s[f"ca_{p}"]
            out.append((f"MIMIC student CA within 3 points of the teacher ({p})", gap <= 3.0,
                        f"{_fmt(s[f'ca_{p}'])} vs {_fmt(t[f'ca_{p}'])} (student - teacher = {-gap:+.1f})"))
    return out


def versus_baselines(rows: dict) -> list[str]:
    """Is MIMIC at least as good as each baseline on ASR at no more than its CA loss? (per probe)"""
    lines = []
    s, t = rows.get("mimic"), rows.get("teacher")
    if not (s and t):
        return ["MIMIC or the teacher has not been evaluated yet: no comparison."]
    for name, label, group in ROWS:
        if group != "baseline":
            continue
        b = rows.get(name)
        if b is None:
            lines.append(f"- {label}: not run yet.")
            continue
        parts = []
        for p in PROBES:
            asr_ok = s[f"asr_{p}"] <= b[f"asr_{p}"]
            loss_s, loss_b = t[f"ca_{p}"] - s[f"ca_{p}"], t[f"ca_{p}"] - b[f"ca_{p}"]
            ca_ok = loss_s <= loss_b
            verdict = "MIMIC at least as good" if asr_ok and ca_ok else "**MIMIC not better**"
            detail = (f"ASR {_fmt(s[f'asr_{p}'])} vs {_fmt(b[f'asr_{p}'])} %{'' if asr_ok else ' (higher)'}, "
                      f"CA loss {loss_s:+.1f} vs {loss_b:+.1f} points{'' if ca_ok else ' (larger)'}")
            parts.append(f"{p}: {verdict} ({detail})")
        lines.append(f"- vs {label}: " + "; ".join(parts) + ".")
    return lines


def render(rows: dict, img_rel: str, images: list[str]) -> str:
    meta = rows["_meta"]
    params = meta["params"]
    gpu = (params.get("profiles") or {}).get("gpu", {})
    enc = params["encoder"]
    L = []
    L.append("# CIFAR-10 reference scenario: results\n")
    L.append("Generated by `scenarios/cifar10/report.py` from the metrics the DVC pipeline wrote "
             "(`scenarios/cifar10/metrics/*.json`, `records/*.json`, `mi/*/mi.json`); do not edit by hand. "
             "Re-generate with `python scenarios/cifar10/report.py write` (the pipeline's `report` stage does it).\n")
    n = meta["n_train"]
    L.append(f"Setup (CPU profile, `scenarios/cifar10/params.yaml`): CIFAR-10 ({n or '?'} training images); "
             f"{enc['arch']} width {enc['width']}; SimCLR {params['pretrain']['epochs']} epochs on "
             f"{params['pretrain']['train_size']} images; BadEncoder {params['attack']['epochs']} epochs on "
             f"{params['attack']['shadow_size']} shadow images, {params['attack']['trigger_size']}x{params['attack']['trigger_size']} "
             f"white patch bottom-right, target class {meta['target']} with {params['attack']['n_reference']} reference image(s); "
             f"MI ({params['mi']['estimator'].upper()}, {params['mi']['epochs']} critic epochs); distillation "
             f"{params['distill']['epochs']} epochs on D = {params['data']['clean_size']} stratified clean images; probes: linear "
             f"and MLP ({params['evaluate']['epochs']} epochs on {params['evaluate']['train_size']} labelled training images), "
             f"evaluated on the 10,000 CIFAR-10 test images. ASR excludes test images of the target class. "
             f"Accuracies in %.\n")
    L.append("| encoder / defense | CA linear | ASR linear | CA MLP | ASR MLP | clean data D | training time | eval time | device |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, _, _ in ROWS:
        r = rows.get(name)
        if r is None:
            L.append(f"| {dict((a, b) for a, b, _ in ROWS)[name]} | not run | | | | | | | |")
            continue
        d = "–" if r["d_images"] is None else f"{r['d_images']} ({r['d_pct']:.0f}%)" if r["d_pct"] else str(r["d_images"])
        tr = _dur(r["train_s"]) + (f" + MI {_dur(r['mi_s'])}" if r["mi_s"] else "")
        L.append(f"| {r['label']} | {_fmt(r['ca_linear'])} | {_fmt(r['asr_linear'])} | {_fmt(r['ca_mlp'])} | "
                 f"{_fmt(r['asr_mlp'])} | {d} | {tr} | {_dur(r['eval_s'])} | {r['device']} |")
    L.append("")
    L.append("Training time: the stage's own training loop (pre-training, attack, fine-tuning or distillation; "
             "\"+ MI\" adds the MI stage whose weights the run used); eval time: both probes, features of the "
             "labelled training images, the test set and the triggered test set. \"–\" = reused from an earlier run "
             "(cached) or not recorded.\n")

    L.append("## Acceptance (issue 5)\n")
    for what, ok, val in acceptance(rows):
        L.append(f"- {'PASS' if ok else 'FAIL'}: {what}: {val}")
    L.append("")
    L.append("## MIMIC against the baselines\n")
    L.append("Criterion: MIMIC's ASR is no higher than the baseline's and its CA loss (teacher CA minus "
             "encoder CA) is no larger than the baseline's; computed per probe, no tolerance.\n")
    vs = versus_baselines(rows)
    L.extend(vs)
    all_ok = all("not better" not in v and "not run" not in v for v in vs)
    s_, t_ = rows.get("mimic"), rows.get("teacher")
    done = [rows[n] for n, _, g in ROWS if g == "baseline" and n in rows]
    if s_ and t_ and done:
        for p in PROBES:
            lower = all(s_[f"asr_{p}"] <= b[f"asr_{p}"] for b in done)
            L.append(f"- {p} probe: MIMIC's ASR is {'the lowest' if lower else 'not the lowest'} among MIMIC and the "
                     f"{len(done)} baseline(s) run ({_fmt(s_[f'asr_{p}'])} % vs "
                     + ", ".join(f"{_fmt(b[f'asr_{p}'])}" for b in done)
                     + f"), at a CA loss of {t_[f'ca_{p}'] - s_[f'ca_{p}']:+.1f} points (the acceptance allows 3).")
        L.append("")
    L.append("")
    L.append(("**MIMIC is at least as good as every baseline on ASR at no more than its CA loss, on both probes.**"
              if all_ok else "**MIMIC is not at least as good as every baseline on both probes (strict criterion); not met or not run: "
              + "; ".join(label.removeprefix("baseline: ") for (name, label, g), v in
                          zip([r for r in ROWS if r[2] == "baseline"], [v for v in vs if v.startswith("- ")])
                          if "not better" in v or "not run" in v) + ".**") + "\n")

    L.append("## MI per stage\n")
    for who in ("teacher", "student", "clean500", "clean1000"):
        mi = _load(HERE / "mi" / who / "mi.json")
        if not mi:
            continue
        stages = mi["stages"]
        L.append(f"MI measured on the **{mi.get('network', who)}**" + (f" (D = {who[5:]} images)" if who.startswith("clean") else "")
                 + ": " + ", ".join(f"{s} {mi['mi'][s]:.3f} (weight {mi['weights'][s]:.0f})" for s in stages) + ".\n")
    for img in images:
        L.append(f"![{img}]({img_rel}/{img})\n")

    L.append("## Compute\n")
    L.extend(compute_lines())
    L.append("## Exact commands\n")
    L.append("```bash\n./setup.sh\nPATH=$PWD/.venv/bin:$PATH dvc repro scenarios/cifar10/dvc.yaml   # from the repository root\n"
             "python scenarios/cifar10/report.py write                           # this page (also the `report` stage)\n```\n")
    cmds = _lock_cmds()
    if cmds:
        L.append("The stages as they ran (from `scenarios/cifar10/dvc.lock`; working directory `scenarios/cifar10`):\n")
        L.append("```bash")
        order = [n for n in cmds if not n.startswith("evaluate")] + [n for n in cmds if n.startswith("evaluate")]
        for k in order:
            L.append(f"# {k}\n{cmds[k]}")
        L.append("```\n")

    L.append("## Reproduction check\n")
    L.extend(reproduction_lines())
    L.append("## What reproduced and what did not\n")
    L.extend(discussion(rows, gpu))
    return "\n".join(L) + "\n"


def reproduction_lines() -> list[str]:
    """One bullet per ``records/reproduction*.json``: `report.py compare` run in a fresh clone after
    its `dvc repro`, against the numbers committed in that clone."""
    how = ("`git clone`, `dvc repro scenarios/cifar10/dvc.yaml` (empty DVC cache, so every stage runs), "
           "`python scenarios/cifar10/report.py compare --rev HEAD --tol 1 --json records/reproduction-NAME.json`")
    reps = [r for r in (_load(f) for f in sorted((HERE / "records").glob("reproduction*.json"))) if r]
    if not reps:
        return [f"Not run yet: {how}; copy the JSON into `records/` and rerun the `report` stage.\n"]
    lines = [f"Each line is a fresh clone at a commit: {how}.\n"]
    for rep in sorted(reps, key=lambda r: r.get("date", "")):
        verdict = "**reproduced**" if rep["reproduced"] else "**not reproduced**"
        line = (f"- `{rep.get('commit', rep['rev'])[:12]}` ({rep.get('date', 'date not recorded')}): {verdict}; largest "
                f"|difference| over the {len(rep['rows'])} CA/ASR values {_fmt(rep['max_abs_delta'], 2)} points "
                f"(tolerance {rep['tolerance']:g}), {rep['outside_tolerance']} outside, {len(rep['missing'])} missing; "
                f"models with weights bit-identical to the committed run: {rep['models_identical']} of {len(rep['models'])}.")
        differ = [f"{r['encoder']} {r['probe']} {r['metric'].upper()} {r['delta']:+.2f}" for r in rep["rows"] if r["delta"]]
        if differ:
            line += " Differences: " + ", ".join(differ) + "."
        if rep.get("note"):
            line += " " + rep["note"]
        lines.append(line)
    return lines + [""]


def compute_lines() -> list[str]:
    """Per-stage wall times from the stage records and metrics files, and their sum."""
    items = []
    for f in sorted((HERE / "records").glob("*.json")):
        r = _load(f) or {}
        if r.get("seconds") is not None and not r.get("cached"):
            stage = f.stem[3:] if f.stem.startswith("mi-") else f.stem
            kind = ("mi@" if f.stem.startswith("mi-") else {"clean": "pretrain", "teacher": "attack",
                                                              "finetune": "finetune"}.get(f.stem, "distill@"))
            items.append((kind + stage if kind.endswith("@") else kind, float(r["seconds"])))
    for f in sorted((HERE / "metrics").glob("*.json")):
        r = _load(f) or {}
        if r.get("seconds") is not None:
            items.append((f"evaluate@{f.stem}", float(r["seconds"])))
    if not items:
        return ["No stage has run yet.\n"]
    total = sum(s for _, s in items)
    threads = sorted({str((_load(f) or {}).get("environment", {}).get("threads")) for f in (HERE / "records").glob("*.json")} - {"None"})
    out = [f"Sum of the stage wall times: **{total / 3600:.2f} h** ({len(items)} stages; torch threads per stage: "
           f"{', '.join(threads) or '?'}). Training stages count their training loop, evaluation stages the whole "
           f"command. The run used two stages at a time, one thread each, on a 2-core machine shared with other "
           f"jobs, so the elapsed time was shorter than the sum and single stages ran slower than on an idle machine.\n",
           "| stage | wall time |", "|---|---:|"]
    out += [f"| {k} | {_dur(v)} |" for k, v in items]
    out.append("")
    return out


def discussion(rows: dict, gpu: dict) -> list[str]:
    c, t, s = rows.get("clean"), rows.get("teacher"), rows.get("mimic")
    out = []
    enc = rows["_meta"]["params"]["encoder"]
    out.append(f"The paper (Han et al., TIFS 2025) distils a full-width ResNet-18 (512-d features) for 1,000 epochs "
               f"after 500+ epochs of SimCLR and a long BadEncoder run, and reports that the student keeps the "
               f"teacher's clean accuracy within a few points while the ASR falls to the level of a clean encoder. "
               f"This CPU profile runs width {enc['width']} ({8 * enc['width']}-d features), a few epochs of each "
               f"stage, so absolute accuracies are far below the paper's (~80-90 % CA); what can be checked is the "
               f"relative picture.")
    if c and t and s:
        acc = acceptance(rows)
        lin = [ok for what, ok, _ in acc if "(linear" in what or what.endswith("(linear)")]
        out.append("")
        attack_ok = all(ok for what, ok, _ in acc if what.startswith("teacher") and "(linear" in what)
        defense_ok = all(ok for what, ok, _ in acc if what.startswith("MIMIC") and "(linear" in what)
        out.append(("*Reproduced (linear probe):* " if attack_ok and defense_ok else "*Main result (linear probe):* ")
                   + ("the attack is real" if attack_ok else "the attack is weaker than required")
                   + f" (teacher ASR {_fmt(t['asr_linear'])} % vs {_fmt(c['asr_linear'])} % for the clean encoder, "
                   f"CA {_fmt(t['ca_linear'])} vs {_fmt(c['ca_linear'])}), and MIMIC with "
                   f"{_fmt(s['d_pct'], 0)} % of the training set "
                   + ("brings" if defense_ok else "takes")
                   + f" the ASR to {_fmt(s['asr_linear'])} % at CA {_fmt(s['ca_linear'])} "
                   f"({s['ca_linear'] - t['ca_linear']:+.1f} points vs the teacher). "
                   + ("All acceptance criteria pass on the linear probe." if all(lin) else
                      "Not every acceptance criterion passes on the linear probe (see above)."))
        out.append(f"With the MLP probe: teacher {_fmt(t['ca_mlp'])} / {_fmt(t['asr_mlp'])}, student "
                   f"{_fmt(s['ca_mlp'])} / {_fmt(s['asr_mlp'])}, clean {_fmt(c['ca_mlp'])} / {_fmt(c['asr_mlp'])} (CA / ASR).")
        abl = [(n, rows[n]) for n, _, g in ROWS if g == "ablation" and n in rows]
        if abl:
            worse = [f"{r['label'].split(': ', 1)[1]} (ASR {_fmt(r['asr_linear'])}, CA {_fmt(r['ca_linear'])})"
                     for n, r in abl if r["asr_linear"] > s["asr_linear"] + 2 or r["ca_linear"] < s["ca_linear"] - 2]
            same = [r["label"].split(": ", 1)[1] for n, r in abl
                    if not (r["asr_linear"] > s["asr_linear"] + 2 or r["ca_linear"] < s["ca_linear"] - 2)]
            out.append("")
            out.append("*Ablations (linear probe, against MIMIC; a difference of more than 2 points counts):* "
                       + (f"worse: {'; '.join(worse)}. " if worse else "none is worse by more than 2 points. ")
                       + (f"Within 2 points of MIMIC: {', '.join(same)}. " if same else "")
                       + "The paper attributes the gain to the MI weighting and the attention term; at this width and "
                         "schedule, differences of a few points are within what one seed can move, so only large gaps "
                         "should be read as effects (one seed per variant here).")
    else:
        out.append("")
        out.append("The main result (clean, teacher, MIMIC) has not been evaluated yet.")
    mi = _load(HERE / "mi" / "teacher" / "mi.json")
    if mi:
        w = [float(v) for v in mi["weights"].values()]
        out.append("")
        out.append(f"*MI weighting:* on the teacher the stage weights span {min(w):.0f} to {max(w):.0f} "
                   f"(ratio {max(w) / min(w):.2f}); with base {rows['_meta']['params']['mi']['base']:.0f} and scale "
                   f"{rows['_meta']['params']['mi']['scale']:.0f} (the authors' values) and similar MI estimates per "
                   f"stage, the weights are {'close to' if max(w) / min(w) < 1.5 else 'far from'} uniform, which bounds how "
                   f"much the MI-vs-uniform ablation can differ at this scale.")
    out.append("")
    out.append(f"*Not reproduced / not run:* the paper's scale. `profiles.gpu` in `scenarios/cifar10/params.yaml` "
               f"holds it (width {gpu.get('encoder', {}).get('width', '?')}, SimCLR "
               f"{gpu.get('pretrain', {}).get('epochs', '?')} epochs, BadEncoder {gpu.get('attack', {}).get('epochs', '?')} "
               f"epochs, distillation {gpu.get('distill', {}).get('epochs', '?')} epochs), but no GPU was available to this "
               f"project when these numbers were made, so it has never run and has no timings. Other attacks (DRUPE, "
               f"other triggers), other datasets and several seeds are not part of this scenario.")
    return out


IMAGES = [("mi/teacher/mi.png", "mi-teacher.png"), ("mi/student/mi.png", "mi-student.png"),
          ("distill/mimic/losses.png", "losses-mimic.png"), ("distill/plain/losses.png", "losses-plain.png"),
          ("distill/teacher_init/losses.png", "losses-teacher_init.png")]


def cmd_write(args: argparse.Namespace) -> None:
    import os
    import shutil

    rows = collect()
    out = Path(args.out).resolve()
    img_dir = Path(args.img).resolve()
    img_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for src, dst in IMAGES:
        if (HERE / src).exists():
            shutil.copyfile(HERE / src, img_dir / dst)
            images.append(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, os.path.relpath(img_dir, out.parent), images))
    print(f"wrote {out} ({sum(1 for k in rows if not k.startswith('_'))} encoders)")


# ---------------------------------------------------------------------------------------------
# compare: does a rerun (e.g. `dvc repro` in a fresh clone) reproduce the committed numbers?


def _git(root: Path, *args: str) -> str | None:
    """stdout of a git command run in ``root``; None when it fails."""
    r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def _git_show(root: Path, rev: str, rel: str) -> str | None:
    return _git(root, "show", f"{rev}:./{rel}")


def _weight_fingerprints(records: dict[str, str | None]) -> dict[str, str]:
    """Weight fingerprint of every model a stage record names (``path`` + ``fingerprint``, the
    content hash of the weights, see mimic.fingerprint), by model path. Not the file's md5: a
    checkpoint also holds metadata (cache keys) that may change while the weights do not."""
    out = {}
    for text in records.values():
        try:
            rec = json.loads(text) if text else None
        except ValueError:
            continue
        if isinstance(rec, dict) and str(rec.get("path", "")).endswith(".pt") and rec.get("fingerprint"):
            out[rec["path"]] = rec["fingerprint"]
    return out


def _record_names(root: Path, rev: str) -> list[str]:
    names = [Path(line).name for line in (_git(root, "ls-tree", "--name-only", rev, "./records/") or "").splitlines()]
    return [n for n in names if n.endswith(".json") and not n.startswith("reproduction")]


def compare(root: Path, rev: str, tol: float) -> dict:
    """Every CA/ASR of metrics/*.json in ``root`` against the same file at ``rev``, and the weight
    fingerprint of every model the stage records name against the one recorded at ``rev`` (equal:
    bit-identical weights)."""
    rows, missing = [], []
    for name, _label, _group in ROWS:
        ref_text, now = _git_show(root, rev, f"metrics/{name}.json"), _load(root / "metrics" / f"{name}.json")
        if ref_text is None and now is None:
            continue
        if ref_text is None or now is None:
            missing.append(f"metrics/{name}.json " + (f"not at {rev}" if ref_text is None else "not in the working tree"))
            continue
        ref, cur = json.loads(ref_text)["encoders"][name], now["encoders"][name]
        for probe in PROBES:
            for metric in ("ca", "asr"):
                a, b = ref.get(probe, {}).get(metric), cur.get(probe, {}).get(metric)
                rows.append({"encoder": name, "probe": probe, "metric": metric, "ref": a, "now": b,
                             "delta": None if a is None or b is None else round(b - a, 2)})
    if not rows and not missing:
        missing.append(f"no metrics/*.json in {root} or at {rev}")
    names = _record_names(root, rev)
    ref_models = _weight_fingerprints({n: _git_show(root, rev, f"records/{n}") for n in names})
    now_models = _weight_fingerprints({n: (root / "records" / n).read_text() for n in names if (root / "records" / n).is_file()})
    models = {p: {"ref": ref_models[p], "now": now_models.get(p), "identical": ref_models[p] == now_models.get(p)}
              for p in sorted(ref_models)}
    deltas = [abs(r["delta"]) for r in rows if r["delta"] is not None]
    bad = [r for r in rows if r["delta"] is None or abs(r["delta"]) > tol]
    head = (_git(root, "rev-parse", rev) or rev).strip()
    return {"rev": rev, "commit": head, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "tolerance": tol, "rows": rows, "missing": missing,
            "max_abs_delta": max(deltas, default=None), "outside_tolerance": len(bad),
            "models": models, "models_identical": sum(m["identical"] for m in models.values()),
            "reproduced": not bad and not missing}


def cmd_compare(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    if _git_show(root, args.rev, "dvc.yaml") is None:
        print(f"error: {root} at {args.rev!r} has no dvc.yaml (not a git checkout of the scenario, or an unknown revision)",
              file=sys.stderr)
        return 2
    res = compare(root, args.rev, args.tol)
    if args.note:
        res["note"] = args.note
    print(f"{'encoder':<16}{'probe':<8}{'metric':<7}{'ref':>7}{'now':>7}{'delta':>7}")
    for r in res["rows"]:
        flag = "" if r["delta"] is not None and abs(r["delta"]) <= args.tol else "  <-- outside"
        print(f"{r['encoder']:<16}{r['probe']:<8}{r['metric']:<7}{_fmt(r['ref'], 2):>7}{_fmt(r['now'], 2):>7}"
              f"{_fmt(r['delta'], 2):>7}{flag}")
    for m in res["missing"]:
        print(f"missing: {m}")
    print(f"models with weights bit-identical to {args.rev}: {res['models_identical']} of {len(res['models'])}")
    verdict = "reproduced" if res["reproduced"] else "NOT reproduced"
    print(f"{verdict}: max |delta| {_fmt(res['max_abs_delta'], 2)} points, tolerance {args.tol:g}, "
          f"{res['outside_tolerance']} value(s) outside, {len(res['missing'])} missing")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["reproduced"] else 1


if __name__ == "__main__":
    sys.exit(main())
