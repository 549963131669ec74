"""Speed and memory of the production distillation step, of a whole audit, and how they scale.

    .venv/bin/python benchmarks/bench_distill.py step [--widths 8 16 64] [--batches 32 128]
        [--precisions fp32 bf16] [--formats auto] [--compile] [--steps 5] [--warmup 1]
        [--data ../shared/data/cifar10.npz] [--clean-size 2000] [--ideal] [--mmap-threshold 0 262144]
        [--json bench-results/distill.json]
    .venv/bin/python benchmarks/bench_distill.py paired --src /path/to/wssun-MIMIC [--steps 5]
    .venv/bin/python benchmarks/bench_distill.py audit --profile cpu-full [--teacher PATH] [--epochs N]
    .venv/bin/python benchmarks/bench_distill.py scaling [--doc docs/performance.md]

``step`` times :func:`mimic.distill.run_epoch` -- the loop ``mimic distill``, the audit, the flow
and DVC run -- with a :class:`mimic.distill.Clock`: data (index + uint8 -> float), augmentation
(both SimCLR views), teacher forward, student forward + backward (loss included), optimiser, other
(loss log). Every configuration runs in a fresh process: its peak RSS is that process's ``VmHWM``
(``ru_maxrss`` would carry the parent's peak over fork+exec). ``--ideal`` also times the bare
network (student forward+backward on 2B images + teacher forward on B): the step's floor, one bare
pass after every timed step, so that both medians come from the same minutes of a shared host.
The first ``--warmup`` steps are reported apart (with ``compile`` they hold compile time).
``--mmap-threshold B`` repeats a configuration with glibc's ``MALLOC_MMAP_THRESHOLD_=B`` (blocks of
B bytes and more are mmap'd and returned on free): its peak RSS is the step's live peak without heap
fragmentation, and its step time what that costs (docs/performance.md, "Memory").

``paired`` runs ``../shared/bench/official_timing.sh`` (the authors' code, their DataLoader, fp32)
and then ``step`` at full width, batch 128, default settings, on the same data: the ratio of one
run on one machine. ``audit`` runs :func:`mimic.audit.run_audit` on a full-width teacher (a random
one unless ``--teacher``) and prints per-stage seconds. ``scaling`` measures width 8/16/32/64,
batch 32..256 and clean-set size 500/2,000/10,000 and rewrites the generated section of
``docs/performance.md`` plus its plot.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CIFAR = ROOT.parent / "shared" / "data" / "cifar10.npz"


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(spec: dict):
    from mimic.config import load_config

    sets = [f"encoder.width={spec['width']}", f"distill.batch_size={spec['batch']}", f"precision={spec['precision']}",
            f"distill.memory_format={spec['format']}", f"distill.compile={str(spec['compile']).lower()}",
            f"data.clean_size={spec['clean_size']}", f"device={spec['device']}"]
    return load_config(profile=spec.get("profile"), sets=sets + list(spec.get("sets", [])))


def _clean_set(cfg, data: str | None):
    import torch

    from mimic.data import ImageSet
    from mimic.inputs import clean_subset, load_data

    if data:
        return clean_subset(cfg, load_data(cfg, data))
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (cfg.data.clean_size, 3, 32, 32), dtype=torch.uint8, generator=g))


def _bare_once(d, batch: int) -> tuple[float, float]:
    """The floor, once: the student's forward+backward on 2B images and the teacher's forward on B, nothing else."""
    import torch

    from mimic.runtime import autocast

    fmt = torch.channels_last if d.channels_last else torch.contiguous_format
    x = torch.rand(2 * batch, 3, 32, 32, device=d.device).contiguous(memory_format=fmt)
    t0 = time.perf_counter()
    with autocast(d.device, d.amp):
        d.student(x).float().sum().backward()
    _sync(d.device)
    t1 = time.perf_counter()
    with torch.no_grad(), autocast(d.device, d.amp):
        d.teacher(x[:batch])
    _sync(d.device)
    t2 = time.perf_counter()
    d.t_taps.outputs, d.s_taps.outputs = {}, {}
    d.student.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def _bare_summary(batch: int, student: list[float], teacher: list[float]) -> dict:
    s, t = _median(student), _median(teacher)
    return {"bare_student_fwd_bwd_s": s, "bare_teacher_fwd_s": t, "ideal_step_s": s + t,
            "bare_fwd_bwd_img_per_s": 2 * batch / s, "bare_times_s": [round(a + b, 3) for a, b in zip(student, teacher)]}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(spec: dict) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess)."""
    import torch

    from mimic.distill import Clock, prepare, run_epoch
    from mimic.encoders import EncoderSpec, build_encoder
    from mimic.runtime import autocast_dtype, generator, resolve_device, set_threads

    threads = set_threads(spec.get("threads"))
    cfg = _config(spec)
    device = resolve_device(cfg.device)
    amp = autocast_dtype(device, cfg.precision)
    clean = _clean_set(cfg, spec.get("data"))
    torch.manual_seed(0)
    teacher = build_encoder(EncoderSpec(arch=cfg.encoder.arch, width=cfg.encoder.width))
    d = prepare(teacher, cfg.distill, [3500.0] * 4, seed=cfg.seed, device=device, amp=amp)
    d.student.train()
    d.head.train()
    clock = Clock(device)
    total, epoch, t_start = spec["warmup"] + spec["steps"], 0, time.perf_counter()
    bare: tuple[list[float], list[float]] = ([], [])
    # --ideal: a bare pass after every production step, so both see the same machine state (on a shared
    # host the speed drifts by 10-20 % within minutes; timing them minutes apart skews the ratio)
    per_call = 1 if spec.get("ideal") else None
    while len(clock.steps) < total:
        before = len(clock.steps)
        left = total - before
        run_epoch(d, clean, epoch, generator(cfg.seed, "distill", epoch), clock=clock,
                  max_steps=min(left, per_call) if per_call else left)
        epoch += 1
        if per_call and len(clock.steps) > spec["warmup"]:
            for a, b in zip(bare, _bare_once(d, spec["batch"])):
                a.append(b)
        if len(clock.steps) >= total:
            break
        if len(clock.steps) == before and epoch > 2 * total:
            raise SystemExit(f"clean set of {len(clean)} images gives no step at batch {spec['batch']}")
    wall = time.perf_counter() - t_start
    warm, timed = clock.steps[: spec["warmup"]], clock.steps[spec["warmup"]:]
    step_s = _median([s for _, s, _ in timed])
    shares: dict[str, float] = {}  # phase seconds over the timed steps (warm-up and compile excluded)
    for _, _, phases in timed:
        for k, v in phases.items():
            shares[k] = shares.get(k, 0.0) + v
    out = {**{k: spec[k] for k in ("width", "batch", "precision", "format", "compile", "clean_size")},
           "device": str(device), "amp": str(amp).replace("torch.", "") if amp else "fp32", "channels_last": d.channels_last,
           "threads": threads, "steps": len(timed), "step_s": step_s, "img_per_s": timed[0][0] / step_s,
           "warmup_s": [round(s, 3) for _, s, _ in warm], "step_times_s": [round(s, 3) for _, s, _ in timed],
           "phase_s": {k: round(v, 3) for k, v in shares.items()},
           "share": {k: round(v / sum(shares.values()), 3) for k, v in shares.items()},
           "wall_s": round(wall, 2)}
    if spec.get("ideal"):
        out.update(_bare_summary(spec["batch"], *bare))
        out["vs_ideal"] = step_s / out["ideal_step_s"]
    d.close()
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def run_one(spec: dict, timeout: float | None = None) -> dict:
    """``one(spec)`` in a fresh interpreter (own peak RSS, own threads, nothing cached)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if spec.get("mmap_threshold"):  # glibc: blocks from this size are mmap'd and handed back on free (no heap reuse)
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    proc = subprocess.run([sys.executable, __file__, "_one", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def env_record(device: str = "auto") -> dict:
    from mimic.results import environment
    from mimic.runtime import native_bf16, physical_cores, resolve_device

    import torch

    info = environment(device)
    info.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), native_bf16=native_bf16(resolve_device(device)),
                physical_cores=physical_cores(), cpu=_cpu_model())
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['width']} | {r['batch']} | {r['precision']} | {r['format']} | {r['compile']} | error: {r['error'][:80]} |"
    sh = r["share"]
    ideal = f"{r['ideal_step_s']:.2f} ({r['vs_ideal']:.2f}x)" if "ideal_step_s" in r else "-"
    fmt = ("NHWC" if r["channels_last"] else "NCHW") + (f", mmap >= {r['mmap_threshold'] // 1024} KiB" if r.get("mmap_threshold") else "")
    return (f"| {r['width']} | {r['batch']} | {r['amp']} | {fmt} | {r['compile']} "
            f"| {r['step_s']:.3f} | {r['img_per_s']:.1f} | {100 * (sh.get('data', 0) + sh.get('augment', 0)):.1f} "
            f"| {100 * sh.get('teacher', 0):.1f} | {100 * sh.get('student', 0):.1f} | {100 * sh.get('optimizer', 0):.1f} "
            f"| {ideal} | {r['peak_rss_mb']:.0f} |")


HEADER = ("| width | batch | precision | format | compile | s/step | img/s | data+aug % | teacher % | student fwd+bwd % "
          "| optimiser % | ideal s (step/ideal) | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _finite(obj):
    """NaN/inf (e.g. an extrapolation the authors' script could not make) as null: JSON has no NaN."""
    if isinstance(obj, float) and obj != obj or obj in (float("inf"), float("-inf")):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj: dict) -> None:
    from mimic.io import write_json as atomic

    atomic(Path(path), _finite(obj))
    print(f"wrote {path}")


def cmd_step(args) -> dict:
    rows = []
    for w in args.widths:
        for b in args.batches:
            for p in args.precisions:
                for f in args.formats:
                    for c, m in itertools.product([False, True] if args.compile else [False], args.mmap_threshold):
                        spec = {"width": w, "batch": b, "precision": p, "format": f, "compile": c, "clean_size": args.clean_size,
                                "device": args.device, "data": args.data, "steps": args.steps, "warmup": args.warmup,
                                "threads": args.threads, "ideal": args.ideal, "profile": args.profile}
                        load = load_average()
                        r = run_one({**spec, "mmap_threshold": m})
                        r["mmap_threshold"] = m
                        r["load_before"], r["load_after"] = load, load_average()
                        rows.append(r)
                        print(fmt_row(r) if rows[1:] else HEADER + "\n" + fmt_row(r), flush=True)
    out = {"mode": "step", "environment": env_record(args.device), "rows": rows}
    if args.json:
        write_json(args.json, out)
    return out


def cmd_paired(args) -> dict:
    """The authors' code, then mimic's production step, same machine, data and batch, one run."""
    with tempfile.TemporaryDirectory() as tmp:
        official = Path(tmp) / "official.json"
        load0 = load_average()
        env = {**os.environ, "PY": sys.executable, "STEPS": str(args.steps)}
        subprocess.run(["bash", str(args.official_script), args.src, str(official)], check=True, env=env)
        theirs = json.loads(official.read_text())
    load1 = load_average()
    spec = {"width": 64, "batch": 128, "precision": "auto", "format": "auto", "compile": False, "clean_size": 2000,
            "device": "cpu", "data": args.data, "steps": args.steps, "warmup": args.warmup, "threads": None, "ideal": True,
            "profile": None}
    ours = run_one(spec)
    load2 = load_average()
    their_s = theirs["s_per_step_as_run"]
    print(f"\nauthors' code: {their_s:.2f} s/step (as run; {theirs.get('s_per_step_full_hooks') or float('nan'):.2f} s "
          f"with their full-run hook count), load {load0} -> {load1}")
    print(HEADER + "\n" + fmt_row(ours) + f"\nload {load1} -> {load2}")
    ratio = their_s / ours["step_s"]
    print(f"\nmimic is {ratio:.2f}x faster per step than the authors' code (as run); "
          f"{ours['vs_ideal']:.2f}x the ideal step")
    out = {"mode": "paired", "environment": env_record("cpu"), "official": {k: v for k, v in theirs.items()
           if k not in ("train_steps", "mi_epochs")}, "mimic": ours, "speedup_vs_official": ratio,
           "load": {"before": load0, "after_official": load1, "after_mimic": load2}}
    if args.json:
        write_json(args.json, out)
    return out


def cmd_audit(args) -> dict:
    """A whole audit at full width: per-stage seconds from the results' stage records."""
    import torch

    from mimic.audit import AuditRequest, run_audit
    from mimic.checkpoints import save_encoder
    from mimic.config import load_config
    from mimic.encoders import EncoderSpec, build_encoder
    from mimic.runtime import set_threads

    set_threads(args.threads)
    sets = list(args.set) + ([f"distill.epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config(profile=args.profile, sets=sets)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher is None:
            torch.manual_seed(0)
            teacher = str(Path(tmp) / "teacher.pt")
            save_encoder(Path(teacher), build_encoder(EncoderSpec(arch=cfg.encoder.arch, width=cfg.encoder.width)))
        load0, t0 = load_average(), time.perf_counter()
        res = run_audit(cfg, AuditRequest(teacher=teacher, data=args.data or cfg.data.source), root=Path(tmp) / "cache",
                        out_dir=Path(tmp) / "out", progress=not args.quiet)
        wall = time.perf_counter() - t0
    stages = {k: v["seconds"] for k, v in res["stages"].items()}
    print(f"audit ({cfg.profile}, width {cfg.encoder.width}, {res['data']['clean_images']} clean images, "
          f"{cfg.distill.epochs} distillation epochs): {wall:.0f} s; load {load0} -> {load_average()}")
    print("| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v:.1f} |")
    out = {"mode": "audit", "environment": env_record(cfg.device), "profile": cfg.profile, "width": cfg.encoder.width,
           "epochs": cfg.distill.epochs, "clean_images": res["data"]["clean_images"], "wall_s": wall, "stages_s": stages,
           "student_ca": res.get("student_ca"), "teacher_ca": res.get("teacher_ca"), "load_before": load0,
           "load_after": load_average()}
    if args.json:
        write_json(args.json, out)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_one"]:
        print(json.dumps(one(json.loads(argv[1]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)

    def common(p, json_default):
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, help="torch threads (default: the physical cores)")
        p.add_argument("--data", default=str(CIFAR) if CIFAR.exists() else None,
                       help="clean images from this dataset (default: ../shared/data/cifar10.npz, else random)")
        p.add_argument("--json", default=json_default)

    p = sub.add_parser("step", help="the production step per configuration")
    common(p, "bench-results/distill.json")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--formats", nargs="+", default=["auto"], help="distill.memory_format values")
    p.add_argument("--compile", action="store_true", help="also each configuration with distill.compile=true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clean-size", type=int, default=2000)
    p.add_argument("--ideal", action="store_true", help="also time the bare network (the step's floor)")
    p.add_argument("--profile", help="a profile of mimic/defaults.yaml to start from")
    p.add_argument("--mmap-threshold", type=int, nargs="+", default=[0], metavar="BYTES",
                   help="also run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES (0 = glibc's default): the peak "
                        "RSS without heap fragmentation, and what it costs in step time (docs/performance.md)")
    p = sub.add_parser("paired", help="the authors' code and mimic's step in one run")
    common(p, "bench-results/paired.json")
    p.add_argument("--src", required=True, help="wssun/MIMIC: a bare git dir or an extracted tree")
    p.add_argument("--official-script", default=str(ROOT.parent / "shared" / "bench" / "official_timing.sh"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p = sub.add_parser("audit", help="a whole audit, per-stage seconds")
    common(p, "bench-results/audit.json")
    p.add_argument("--profile", default="cpu-full")
    p.add_argument("--teacher", help="teacher file (default: a random full-width one; timing only)")
    p.add_argument("--epochs", type=int, help="override distill.epochs")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("scaling", help="width / batch / clean-set scaling, docs/performance.md")
    common(p, "bench-results/scaling.json")
    p.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--from-json", help="rewrite the doc from an earlier scaling JSON instead of measuring")
    args = ap.parse_args(argv)
    if args.mode == "scaling":
        from bench_scaling import cmd_scaling  # benchmarks/bench_scaling.py, next to this file

        cmd_scaling(args)
    else:
        {"step": cmd_step, "paired": cmd_paired, "audit": cmd_audit}[args.mode](args)


if __name__ == "__main__":
    main()
