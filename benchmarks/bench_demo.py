"""Does the demo's headline hold? `mimic demo` over a grid of seeds x CPU thread counts.

    .venv/bin/python benchmarks/bench_demo.py [--seeds 0 1 2 3 4] [--threads 1 2] [--data synthetic]
        [--set KEY=VALUE ...] [--out bench-results/demo] [--json bench-results/demo.json] [--markdown FILE]

Each cell is one `mimic demo --set seed=S --threads T` in its own process and output directory
(the stage cache is per directory, so no cell reuses another's models; a rerun of the same cell
reuses its own cache and finishes in seconds). Prints CA/ASR of the clean encoder, the BadEncoder
teacher and the MIMIC student per cell, then mean / min / max per column and whether every cell
meets the demo's bounds (student ASR <= 10, student CA within 5 points of the teacher). ``--markdown``
writes the same table for the README (regenerated, never typed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MAX_ASR, MAX_CA_DROP = 10.0, 5.0
COLUMNS = ("clean_ca", "clean_asr", "teacher_ca", "teacher_asr", "student_ca", "student_asr")


def run_cell(seed: int, threads: int, data: str, sets: list[str], out: Path) -> dict:
    res_file = out / "cell.json"
    cmd = [sys.executable, "-m", "mimic.cli", "demo", "--quiet", "--threads", str(threads), "--set", f"seed={seed}",
           "--out", str(out), "--json", str(res_file)]
    if data != "synthetic":
        cmd += ["--data", data]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3) or not res_file.exists():  # 3: the gate rejected the student
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        return {"seed": seed, "threads": threads, "error": tail[0], "wall_s": round(wall, 1)}
    res = json.loads(res_file.read_text())
    cell = {"seed": seed, "threads": threads, "wall_s": round(wall, 1), "verdict": res["verdict"]["verdict"],
            "probe": res.get("probe"), **{k: res.get(k) for k in COLUMNS}}
    cell["ok"] = (cell["student_asr"] is not None and cell["student_asr"] <= MAX_ASR
                  and cell["teacher_ca"] - cell["student_ca"] <= MAX_CA_DROP)
    return cell


def summary(cells: list[dict]) -> dict:
    good = [c for c in cells if "error" not in c]
    out = {}
    for k in (*COLUMNS, "wall_s"):
        vals = [c[k] for c in good if c.get(k) is not None]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    out["cells"], out["ok"] = len(cells), sum(bool(c.get("ok")) for c in cells)
    out["all_ok"] = out["ok"] == len(cells)
    return out


def table(cells: list[dict], summ: dict) -> str:
    head = "| seed | threads | clean CA | clean ASR | teacher CA | teacher ASR | student CA | student ASR | within bounds | wall |"
    lines = [head, "|" + "---:|" * 9 + "---:|"]
    for c in cells:
        if "error" in c:
            lines.append(f"| {c['seed']} | {c['threads']} | error: {c['error']} | | | | | | no | {c['wall_s']:.0f} s |")
            continue
        vals = " | ".join(f"{c[k]:.1f}" for k in COLUMNS)
        lines.append(f"| {c['seed']} | {c['threads']} | {vals} | {'yes' if c['ok'] else '**no**'} | {c['wall_s']:.0f} s |")
    for stat in ("mean", "min", "max"):
        vals = " | ".join(f"{summ[k][stat]:.1f}" if k in summ else "–" for k in COLUMNS)
        wall = f"{summ['wall_s'][stat]:.0f} s" if "wall_s" in summ else "–"
        lines.append(f"| **{stat}** | | {vals} | | {wall} |")
    lines.append("")
    lines.append(f"{summ['ok']} of {summ['cells']} runs within bounds (student ASR <= {MAX_ASR:g}, "
                 f"student CA within {MAX_CA_DROP:g} points of the teacher).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", default="synthetic", help="synthetic (the built-in demo) or a dataset, e.g. ../shared/data/cifar10.npz")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="extra demo parameters")
    ap.add_argument("--out", default="bench-results/demo", help="one output directory per cell below this")
    ap.add_argument("--json", default="bench-results/demo.json")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    cells = []
    for seed in args.seeds:
        for threads in args.threads:
            cell = run_cell(seed, threads, args.data, args.sets, Path(args.out) / f"seed{seed}-t{threads}")
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    summ = summary(cells)
    text = table(cells, summ)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"data": args.data, "sets": args.sets, "cells": cells, "summary": summ}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0 if summ["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
