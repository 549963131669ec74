"""bf16 vs fp32 students: MIMIC on one teacher, a few seeds per training precision (issue 14, point 3).

    nice .venv/bin/python benchmarks/bench_precision.py [--seeds 0 1 2] [--out /tmp/precision]
        [--json benchmarks/results/precision-cifar10.json] [--doc docs/performance.md] [--tabulate-only]
    .venv/bin/python benchmarks/bench_precision.py --setup full --teacher T.pt --epochs 5 [--seeds 0 1 2] ...

``--setup scenario`` (default): the CIFAR-10 scenario's teacher and MI, width 8 (``dvc repro
scenarios/cifar10/dvc.yaml:mi@teacher`` first); its commands and params, one thread per lane, the two precisions
side by side (one core each). ``--setup full``: a full-width teacher (``--teacher``, e.g. ``mimic attack badencoder
--profile cpu-full``) under ``--profile cpu-full`` with ``--epochs`` distillation epochs (a short run); its MI is
measured once (``mimic mi``), then the lanes run one after the other on all cores.

Per precision and seed: ``mimic distill --set precision=P --set seed=S`` and ``mimic evaluate`` of the student,
always in fp32 (so only the training precision differs), CA/ASR per probe. ``--tabulate-only`` reads the outputs
already in ``--out``. The table goes between the setup's markers of ``--doc`` (``precision:begin``/``precision:end``,
``precision-full:begin``/``precision-full:end``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docblock  # benchmarks/docblock.py, next to this file

from mimic.io import write_json

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "cifar10"
CIFAR = (ROOT.parent / "shared" / "data" / "cifar10.npz").resolve()
BLOCKS = {"scenario": ("<!-- precision:begin -->", "<!-- precision:end -->"),
          "full": ("<!-- precision-full:begin -->", "<!-- precision-full:end -->")}
PROBES = ("linear", "mlp", "linear_z", "mlp_z")
MIMIC = [sys.executable, "-m", "mimic.cli"]


@dataclass(frozen=True)
class Setup:
    """Where and how the students of one bench are made."""

    name: str
    cwd: Path
    common: list[str]  # options of every mimic command (params, profile, threads, data)
    teacher: str
    mi: str
    parallel: bool  # the precisions side by side (one core each) or one after the other
    epochs: int | None = None


def setup_of(args: argparse.Namespace, out: Path) -> Setup:
    if args.setup == "scenario":
        common = ["--params", "params.yaml", "--profile", "cpu", "--threads", "1", "--data", str(CIFAR)]
        return Setup("scenario", SCENARIO, common, "models/teacher.pt", "mi/teacher/mi.json", parallel=True)
    if not args.teacher or not args.epochs:
        raise SystemExit("--setup full needs --teacher PATH and --epochs N")
    common = ["--profile", "cpu-full", "--threads", str(args.threads), "--data", str(CIFAR),
              "--set", f"distill.epochs={args.epochs}"]
    return Setup("full", Path.cwd(), common, str(Path(args.teacher).resolve()), str(out / "mi" / "mi.json"),
                 parallel=False, epochs=args.epochs)


def measure_mi(st: Setup, out: Path) -> None:
    """The teacher's MI weights, once for every lane (``--setup full``; the scenario's come from its DVC stage)."""
    if not Path(st.mi).exists():
        subprocess.run([*MIMIC, "mi", *st.common, "--quiet", "--cache", str(out / "cache"), "--teacher", st.teacher,
                        "--out", str(Path(st.mi).parent), "--json", str(out / "mi.json")], cwd=st.cwd, check=True)


def lane(st: Setup, precision: str, seeds: list[int], out: Path) -> None:
    """Distil and evaluate one precision's students, one seed after the other."""
    common = [*st.common, "--quiet", "--cache", str(out / "cache")]
    for s in seeds:
        o = out / f"{precision}-s{s}"
        subprocess.run([*MIMIC, "distill", *common, "--set", f"precision={precision}", "--set", f"seed={s}",
                        "--teacher", st.teacher, "--mi", st.mi, "--out", str(o),
                        "--json", f"{o}.distill.json"], cwd=st.cwd, check=True)
        subprocess.run([*MIMIC, "evaluate", *common, "--set", "precision=fp32", "--set", f"seed={s}",
                        "--encoder", f"s={o}/student.pt", "--trigger", st.teacher,
                        "--metrics", f"{o}.metrics.json", "--json", f"{o}.eval.json"], cwd=st.cwd, check=True)


def tabulate(out: Path, precisions: list[str], seeds: list[int]) -> dict:
    """Per precision: CA/ASR per probe and seed, mean and std, and the distillation seconds."""
    res: dict = {"seeds": seeds, "precisions": {}}
    for p in precisions:
        runs = []
        for s in seeds:
            m = json.loads((out / f"{p}-s{s}.metrics.json").read_text())["encoders"]["s"]
            d = json.loads((out / f"{p}-s{s}.distill.json").read_text())
            runs.append({"seed": s, "seconds": d.get("seconds"), "fingerprint": d.get("fingerprint"),
                         **{f"{q}_{k}": m[q][k] for q in PROBES if q in m for k in ("ca", "asr")}})
        keys = [k for k in runs[0] if k.endswith(("_ca", "_asr"))]
        res["precisions"][p] = {"runs": runs, **{k: {"mean": statistics.mean(r[k] for r in runs),
                                                     "std": statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0}
                                                 for k in keys + ["seconds"]}}
    return res


def render(res: dict) -> str:
    n = len(res["seeds"])
    what = ("the CIFAR-10 scenario's teacher (width 8, 30 epochs, D = 2,000)" if res.get("setup", "scenario") == "scenario"
            else f"a full-width BadEncoder teacher (`--profile cpu-full`: width 64, D = 2,000; a short run of "
                 f"{res['epochs']} distillation epochs)")
    lines = [f"MIMIC students of {what}, trained in each precision "
             f"(seeds {', '.join(map(str, res['seeds']))}: distillation and probe seed; the teacher and MI weights fixed), "
             f"all evaluated in fp32; mean ± std over n = {n}. Generated by `benchmarks/bench_precision.py"
             f"{' --setup full' if res.get('setup') == 'full' else ''}`.", "",
             "| training precision | " + " | ".join(f"{q} CA | {q} ASR" for q in PROBES) + " | distill s |",
             "|---|" + "---:|" * (2 * len(PROBES) + 1)]
    for p, r in res["precisions"].items():
        cells = [f"{r[f'{q}_{k}']['mean']:.2f} ± {r[f'{q}_{k}']['std']:.2f}" for q in PROBES for k in ("ca", "asr")]
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {r['seconds']['mean']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=sorted(BLOCKS), default="scenario")
    ap.add_argument("--teacher", help="--setup full: the full-width teacher file")
    ap.add_argument("--epochs", type=int, help="--setup full: distillation epochs")
    ap.add_argument("--threads", type=int, default=2, help="--setup full: torch threads")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", type=Path, default=Path("bench-results/precision"))
    ap.add_argument("--json", default="bench-results/precision-cifar10.json")
    ap.add_argument("--doc", type=Path, help="write the table into this file's precision block")
    ap.add_argument("--tabulate-only", action="store_true")
    args = ap.parse_args()
    out = args.out.resolve()
    st = setup_of(args, out)
    if not args.tabulate_only:
        if st.name == "full":
            measure_mi(st, out)
        if st.parallel:
            with ThreadPoolExecutor(len(args.precisions)) as ex:
                list(ex.map(lambda p: lane(st, p, args.seeds, out), args.precisions))
        else:
            for p in args.precisions:
                lane(st, p, args.seeds, out)
    res = {"setup": st.name, "epochs": st.epochs, "command": sys.argv[1:], **tabulate(out, args.precisions, args.seeds)}
    write_json(args.json, res)
    print(render(res))
    if args.doc:
        docblock.replace_block(args.doc, *BLOCKS[st.name], render(res))


if __name__ == "__main__":
    main()
