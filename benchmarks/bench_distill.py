"""Distillation step throughput (img/s) and peak memory, and the MI phase wall time.

    .venv/bin/python benchmarks/bench_distill.py [--widths 16 64] [--batches 32 128] [--steps 5]
        [--device auto] [--precision fp32|bf16|auto] [--json bench-results/distill.json]

One "image" is one clean image per step (two augmented views, student on both, teacher on one).
Peak memory: CUDA max allocated on GPUs; on CPUs the peak RSS of a fresh process that runs just
that configuration (each configuration is measured in its own subprocess).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from mimic.augment import simclr_augment
from mimic.config import load_config
from mimic.data import ImageSet
from mimic.encoders import EncoderSpec, ProjectionHead, StageTaps, build_encoder, freeze
from mimic.losses import clone_loss, nt_xent, weighted_attention
from mimic.mi import analyse
from mimic.runtime import autocast, autocast_dtype, environment, resolve_device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distill_throughput(width: int, batch: int, steps: int, device: torch.device, amp) -> dict:
    spec = EncoderSpec(width=width)
    teacher = freeze(build_encoder(spec)).to(device)
    student = build_encoder(spec).to(device)
    head = ProjectionHead(student.feature_dim).to(device)
    opt = torch.optim.Adam(list(student.parameters()) + list(head.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device)
    w = [3500.0] * 4
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with StageTaps(teacher, teacher.stage_paths()) as tt, StageTaps(student, student.stage_paths()) as st:
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x1, x2 = simclr_augment(x, g), simclr_augment(x, g)
            with autocast(device, amp):
                with torch.no_grad():
                    ft = teacher(x1)
                    ht = tt.take()
                fs = student(torch.cat([x1, x2]))
                hs = [h[:batch] for h in st.take()]
                loss = nt_xent(head(fs[:batch]), head(fs[batch:])) + weighted_attention(hs, ht, w) + clone_loss(fs[:batch], ft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"width": width, "batch": batch, "img_per_s": batch / med, "step_s": med, "peak_mem_mb": round(peak, 1)}


def mi_time(width: int, n: int, device: torch.device) -> dict:
    cfg = load_config().mi
    enc = build_encoder(EncoderSpec(width=width)).to(device)
    images = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8))
    t0 = time.perf_counter()
    analyse(enc, images, epochs=cfg.epochs, batch_size=cfg.batch_size, hidden=cfg.hidden, pool=cfg.pool, device=device)
    return {"width": width, "images": n, "epochs": cfg.epochs, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mi-images", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", default="bench-results/distill.json")
    ap.add_argument("--single", type=int, nargs=2, metavar=("WIDTH", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = resolve_device(args.device)
    amp = autocast_dtype(device, args.precision)
    if args.single:
        print(json.dumps(distill_throughput(*args.single, args.steps, device, amp)))
        return
    rows = []
    for w in args.widths:
        for b in args.batches:
            cmd = [sys.executable, __file__, "--single", str(w), str(b), "--steps", str(args.steps),
                   "--device", args.device, "--precision", args.precision]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"distillation step on {device} ({args.precision}, amp={amp})")
    print(f"{'width':>5} {'batch':>5} {'img/s':>8} {'step s':>7} {'peak MB':>8}")
    for r in rows:
        print(f"{r['width']:>5} {r['batch']:>5} {r['img_per_s']:>8.1f} {r['step_s']:>7.3f} {r['peak_mem_mb']:>8.1f}")
    mi = [mi_time(w, args.mi_images, device) for w in args.widths]
    print(f"\nMI phase ({args.mi_images} images, all stages, one feature pass)")
    for r in mi:
        print(f"width {r['width']:>3}: {r['seconds']:.1f} s ({r['epochs']} critic epochs)")
    out = {"environment": environment(device), "precision": args.precision, "distill": rows, "mi": mi}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
