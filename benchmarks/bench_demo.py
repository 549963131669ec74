"""Does the demo's headline hold? `mimic demo` over a grid of seeds x CPU thread counts.

    .venv/bin/python benchmarks/bench_demo.py [--seeds 0 1 2 3 4] [--threads 1 2] [--data synthetic]
        [--set KEY=VALUE ...] [--out bench-results/demo] [--json bench-results/demo.json] [--markdown FILE]
        [--readme docs/findings.md] [--cores N] [--from-json A.json ...]

Each cell is one `mimic demo --set seed=S --threads T` in its own process and output directory
(the stage cache is per directory, so no cell reuses another's models; a rerun of the same cell
reuses its own cache and finishes in seconds; the table names a cell's reused stages, and the wall
summary counts only cells that computed every stage). Prints CA/ASR of the clean encoder, the BadEncoder
teacher and the MIMIC student per cell, then mean / min / max per column and whether every cell
meets the demo's bounds (student ASR <= 10, student CA within 5 points of the teacher). The numbers
are the gate's: the worst case over every probe the demo runs (``results.worst_case``). ``--markdown``
writes the table to a file; ``--readme`` replaces the block between ``<!-- demo-grid:begin -->`` and
``<!-- demo-grid:end -->`` in that file with it (docs/findings.md's grid: regenerated, never typed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import docblock  # benchmarks/docblock.py, next to this file

BEGIN, END = "<!-- demo-grid:begin -->", "<!-- demo-grid:end -->"

MAX_ASR, MAX_CA_DROP = 10.0, 5.0
COLUMNS = ("clean_ca", "clean_asr", "teacher_ca", "teacher_asr", "student_ca", "student_asr")
WORST = ("worst_student_asr", "worst_ca_drop")


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
    w = res.get("worst_case") or {}
    cell = {"seed": seed, "threads": threads, "wall_s": round(wall, 1), "verdict": res["verdict"]["verdict"],
            "probe": res.get("probe"), **{k: res.get(k) for k in COLUMNS},
            "worst_student_asr": w.get("student_asr"), "worst_asr_probe": w.get("asr_probe"),
            "worst_ca_drop": w.get("ca_drop"), "worst_ca_probe": w.get("ca_probe"),
            "reused": sorted(k for k, v in (res.get("cached") or {}).items() if v)}
    asr = cell["worst_student_asr"] if cell["worst_student_asr"] is not None else cell["student_asr"]
    drop = cell["worst_ca_drop"] if cell["worst_ca_drop"] is not None else cell["teacher_ca"] - cell["student_ca"]
    cell["ok"] = asr is not None and asr <= MAX_ASR and drop <= MAX_CA_DROP
    return cell


def summary(cells: list[dict]) -> dict:
    good = [c for c in cells if "error" not in c]
    out = {}
    for k in (*COLUMNS, *WORST, "wall_s"):
        vals = [c[k] for c in good if c.get(k) is not None and not (k == "wall_s" and c.get("reused"))]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    out["cells"], out["ok"] = len(cells), sum(bool(c.get("ok")) for c in cells)
    out["all_ok"] = out["ok"] == len(cells)
    return out


def table(cells: list[dict], summ: dict) -> str:
    head = ("| seed | threads | clean CA | clean ASR | teacher CA | teacher ASR | student CA | student ASR "
            "| student ASR, worst probe | CA drop, worst probe | within bounds | wall |")
    lines = [head, "|" + "---:|" * 11 + "---:|"]

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    for c in cells:
        if "error" in c:
            lines.append(f"| {c['seed']} | {c['threads']} | error: {c['error']} | | | | | | | | no | {c['wall_s']:.0f} s |")
            continue
        vals = " | ".join(f(c[k]) for k in COLUMNS)
        worst = (f"{f(c['worst_student_asr'])} ({c['worst_asr_probe']}) | {f(c['worst_ca_drop'])} ({c['worst_ca_probe']})"
                 if c.get("worst_asr_probe") else "– | –")
        wall = f"{c['wall_s']:.0f} s" + (f" ({', '.join(c['reused'])} reused)" if c.get("reused") else "")
        lines.append(f"| {c['seed']} | {c['threads']} | {vals} | {worst} | {'yes' if c['ok'] else '**no**'} | {wall} |")
    for stat in ("mean", "min", "max"):
        vals = " | ".join(f"{summ[k][stat]:.1f}" if k in summ else "–" for k in (*COLUMNS, *WORST))
        wall = f"{summ['wall_s'][stat]:.0f} s" if "wall_s" in summ else "–"
        lines.append(f"| **{stat}** | | {vals} | | {wall} |")
    lines.append("")
    lines.append(f"{summ['ok']} of {summ['cells']} runs within bounds (student ASR <= {MAX_ASR:g} and CA drop <= "
                 f"{MAX_CA_DROP:g} points, both on the worst probe: linear and MLP, raw and z-scored features).")
    return "\n".join(lines)


def run_grid(grid: list[tuple[int, int]], cores: int, run) -> list[dict]:
    """Run every (seed, threads) cell, side by side while the running cells' threads fit in ``cores``
    (two 1-thread cells share 2 cores; a 2-thread cell runs alone); cells come back in grid order."""
    results: dict[tuple[int, int], dict] = {}
    pending = sorted(grid, key=lambda st: -st[1])  # widest first, so narrow cells fill the gaps
    with ThreadPoolExecutor(max_workers=max(1, cores)) as pool:
        running: dict = {}
        while pending or running:
            used = sum(st[1] for st in running.values())
            fits = next((st for st in pending if used + st[1] <= cores or not running), None)
            if fits is not None:
                pending.remove(fits)
                running[pool.submit(run, fits)] = fits
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                results[running.pop(fut)] = cell = fut.result()
                print(json.dumps(cell), flush=True)
    return [results[st] for st in grid]


def machine() -> dict:
    """The CPU the grid ran on: its model, cores and the precision ``precision: auto`` resolves to there (bf16 autocast
    only with AVX512-BF16/AMX), since the demo's numbers and wall times depend on both."""
    import platform

    import torch

    from mimic.runtime import autocast_dtype

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    amp = autocast_dtype(torch.device("cpu"), "auto")
    return {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "precision": "bf16 autocast" if amp == torch.bfloat16 else "fp32"}


def replace_block(path: Path, text: str) -> None:
    """Put ``text`` between this page's BEGIN/END markers of ``path``."""
    docblock.replace_block(path, BEGIN, END, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", default="synthetic", help="synthetic (the built-in demo) or a dataset, e.g. ../shared/data/cifar10.npz")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="extra demo parameters")
    ap.add_argument("--out", default="bench-results/demo", help="one output directory per cell below this")
    ap.add_argument("--json", default="bench-results/demo.json")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--readme", type=Path, help="replace the demo-grid block of this file with the table")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="tabulate the cells of earlier --json files instead of running")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="run cells side by side while their threads fit in this many cores (default: all)")
    args = ap.parse_args(argv)
    if args.from_json:  # the table (and README block) of earlier runs, without running anything
        earlier = [json.loads(Path(p).read_text()) for p in args.from_json]
        cells = [c for e in earlier for c in e["cells"]]
        args.seeds, args.threads = sorted({c["seed"] for c in cells}), sorted({c["threads"] for c in cells})
        args.data, args.sets = earlier[0]["data"], earlier[0]["sets"]
        where = earlier[0].get("machine")
    else:
        grid = [(seed, threads) for seed in args.seeds for threads in args.threads]
        cells = run_grid(grid, args.cores, lambda st: run_cell(st[0], st[1], args.data, args.sets,
                                                              Path(args.out) / f"seed{st[0]}-t{st[1]}"))
        where = {**machine(), "grid_cores": args.cores}
    summ = summary(cells)
    text = table(cells, summ)
    if where:
        text += (f"\n\nMeasured on {where['cpu']}, {where['cores']} cores, {where['precision']}; cells ran side by side "
                 f"while their threads fit in {where['grid_cores']} cores (a wall is a fresh demo's only for a cell that ran alone).")
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"data": args.data, "sets": args.sets, "machine": where, "cells": cells, "summary": summ}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.readme:
        cmd = " ".join(["benchmarks/bench_demo.py", "--seeds", *map(str, args.seeds), "--threads", *map(str, args.threads),
                        *(["--data", args.data] if args.data != "synthetic" else []), *[f"--set {s}" for s in args.sets]])
        replace_block(args.readme, f"{text}\n\nRegenerated by `{cmd} --readme {args.readme}`.")
    return 0 if summ["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
