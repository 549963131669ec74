"""``mimic scan ENCODER --data CLEAN``: trigger inversion of one encoder (exit 3 when suspicious)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mimic.cli import add_command, common, say


def cmd_scan(args: argparse.Namespace) -> dict:
    from mimic.cli.commands import _clean, cache_of, check_source, config, export, run_stage
    from mimic.inputs import admit_teacher
    from mimic.stages.scan import plan_scan, scan_record

    check_source(args.data, "--data")
    cfg = config(args)
    enc = admit_teacher(args.encoder, cfg.limits)
    clean, ver, data = _clean(args, cfg)
    run = run_stage(cfg, plan_scan(cfg, Path(args.encoder).stem, enc.loaded, enc.fingerprint, clean, ver,
                                   progress=not args.quiet), cache_of(args))
    out = Path(args.out) if args.out else Path("runs/scans") / enc.fingerprint[:12]
    export(run, out)
    rec = scan_record(run, cfg.scan.threshold)
    target = "" if rec["target_class"] is None else (f", stamped images collapse to class {rec['target_class']} "
                                                     f"({100 * rec['target_share']:.0f}% of them)")
    say(args, f"scan of {enc.fingerprint[:12]}: {rec['verdict']} ({rec['reason']}); similarity {rec['similarity']:.3f} "
        f"(clean images {rec['clean_similarity']:.3f}){target}")
    say(args, f"inverted trigger: {out / 'trigger.npz'} (loads as --trigger), picture: {out / 'trigger.png'}"
        + (" [cached]" if run.cached else ""))
    return {"encoder": enc.info(), "data": data, "scan": rec, "trigger": str(out / "trigger.npz"),
            "plot": str(out / "trigger.png"), "out": str(out),
            "verdict": {"verdict": rec["verdict"], "passed": not rec["suspicious"], "reason": rec["reason"]},
            "stage": run.stage, "key": run.key, "cached": run.cached, "seconds": run.seconds}


def register(sub: Any) -> None:
    p = add_command(sub, "scan", cmd_scan, help="trigger inversion: is this encoder backdoored? (exit 3 when suspicious)")
    p.add_argument("encoder", metavar="ENCODER", help="the encoder checkpoint (any layout mimic loads)")
    p.add_argument("--data", required=True, metavar="SRC",
                   help="clean images: synthetic, PATH.npz, an image folder, torchvision:NAME:ROOT (data.clean_size are used)")
    p.add_argument("--out", metavar="DIR", help="writes scan.json, trigger.npz, trigger.png, stage.json "
                   "(default: runs/scans/<fingerprint>)")
    p.add_argument("--cache", default="runs/cache", metavar="DIR", help="the stage cache (default: runs/cache)")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 when suspicious (a DVC stage records the evidence; "
                   "`mimic results` judges)")
    common(p)
