"""The core subcommands: demo, the stage commands the DVC pipeline runs, and small tools (``scan``: mimic.cli.scan)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mimic.cli import add_command, common, say
from mimic.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def config(args: argparse.Namespace, default_profile: str | None = None):
    """The run's configuration: params file <- profile <- --data/--device <- --set."""
    from mimic.config import load_config

    sets = list(args.sets)
    if getattr(args, "device", None):
        sets.append(f"device={args.device}")
    extra = {"data": {"source": args.data}} if getattr(args, "data", None) else None
    args.config = load_config(args.params, args.profile or default_profile, sets, extra)  # main() stamps the environment
    c = args.config
    log.debug("config: params %s, profile %s, overrides %s; seed %d, device %s, precision %s, encoder %s width %d, data %s",
              args.params or "built-in defaults", c.profile or "none", sets or "none", c.seed, c.device, c.precision,
              c.encoder.arch, c.encoder.width, c.data.source)
    return args.config


def check_source(src: str | None, what: str) -> None:
    """A data source that names a local path must exist (one line, before any work starts)."""
    if src and src != "synthetic" and not src.startswith(("torchvision:", "s3://")) and not Path(src).exists():
        raise DataError(f"{what} {src}: no such file or directory")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(res: dict) -> str:
    """The CA/ASR table of a results dict, the MI weights, and the verdict."""
    rows = [("encoder", "CA %", "ASR %")]
    for who in ("clean", "teacher", "student"):
        if f"{who}_ca" in res:
            rows.append((who, fmt(res[f"{who}_ca"]), fmt(res.get(f"{who}_asr"))))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    weights = ", ".join(f"{k} {v:.0f} (MI {res['mi'][k]:.3f})" for k, v in res["weights"].items())
    lines.append(f"MI weights ({res.get('mi_network', 'teacher')}): {weights}")
    lines.append(f"probe: {res['probe']}, target class {res.get('target_class')}, ASR trigger "
                 f"{(res.get('trigger') or {}).get('source') or 'none'}, {res['seconds']:.0f} s")
    scans = res.get("scan") or {}
    if scans:
        lines.append("scan: " + ", ".join(f"{who} PL1 {r['pl1']:.4f} ({r['verdict']})" for who, r in scans.items()))
    lines.append(f"verdict: {res['verdict']['verdict']} ({res['verdict']['reason']})")
    return "\n".join(lines)


def cache_of(args: argparse.Namespace):
    from mimic.cache import StageCache

    return StageCache(args.cache)


def run_stage(cfg: Any, plan: Any, cache: Any) -> Any:
    """A stage command's one stage, bounded by ``timeouts.stage`` like every audit stage."""
    from mimic.audit import run_stage as bounded

    return bounded(cfg, plan, cache)


def export(run: Any, out: Path) -> dict:
    """Copy a stage run's outputs and its manifest into ``out`` (a DVC output directory)."""
    from mimic.cache import MANIFEST
    from mimic.io import copy_file

    for name in run.manifest["files"].values():
        copy_file(run.dir / name, out / name)
    copy_file(run.dir / MANIFEST, out / MANIFEST)
    return {"stage": run.stage, "key": run.key, "cached": run.cached, "out": str(out)}


# ---------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> dict:
    from mimic.audit import run_demo

    real = args.data is not None and args.data != "synthetic"
    cfg = config(args, default_profile="demo-data" if real else None)
    res = run_demo(cfg, Path(args.out), progress=not args.quiet)
    say(args, table(res))
    return res


def cmd_data(args: argparse.Namespace) -> dict:
    import numpy as np

    from mimic.inputs import load_data
    from mimic.io import atomic_write

    ds = load_data(config(args))
    arrays = {"x_train": ds.train.x.permute(0, 2, 3, 1).numpy()}
    if ds.train.y is not None:
        arrays["y_train"] = ds.train.y.numpy()
    if ds.test is not None:
        arrays["x_test"] = ds.test.x.permute(0, 2, 3, 1).numpy()
        if ds.test.y is not None:
            arrays["y_test"] = ds.test.y.numpy()
    atomic_write(args.out, lambda f: np.savez(f, **arrays))
    say(args, f"data: {args.out} ({len(ds.train)} train / {len(ds.test or [])} test images, {ds.num_classes} classes)")
    return {"path": args.out, "version": ds.version, "train": len(ds.train), "test": len(ds.test or []),
            "classes": ds.num_classes, "skipped": ds.skipped}


def cmd_teacher(args: argparse.Namespace) -> dict:
    """The DVC pipeline's teacher: ``teacher.source: demo`` builds the demo BadEncoder teacher; a path
    or ``s3://`` URI is fetched, loaded safely and re-saved in mimic's format (trigger/target kept)."""
    from mimic.checkpoints import save_encoder
    from mimic.inputs import admit_teacher, load_data
    from mimic.io import copy_file

    cfg = config(args)
    src, out = cfg.teacher.source, Path(args.out)
    if src == "demo":
        from mimic.inputs import load_teacher
        from mimic.stages.attack import plan_attack
        from mimic.stages.pretrain import plan_pretrain

        ds, cache = load_data(cfg), cache_of(args)
        pre = run_stage(cfg, plan_pretrain(cfg, ds, progress=not args.quiet), cache)
        att = run_stage(cfg, plan_attack(cfg, load_teacher(pre.path("encoder")), ds, progress=not args.quiet), cache)
        copy_file(att.path("encoder"), out)
        fp = att.manifest["fingerprint"]
    else:
        from mimic.store import fetch

        t = admit_teacher(fetch(src, Path(args.cache) / "fetched"), cfg.limits)
        extras = {k: v for k, v in t.loaded.extras.items() if k in ("trigger_patch", "trigger_mask", "trigger_placement", "target_class")}
        save_encoder(out, t.loaded.encoder, meta={"stage": "teacher", "source": src, "layout": t.loaded.layout},
                     extras=extras)
        fp = t.fingerprint
    say(args, f"teacher: {out} ({fp[:12]}, from {src})")
    return {"path": str(out), "source": src, "fingerprint": fp}


def cmd_pretrain(args: argparse.Namespace) -> dict:
    from mimic.inputs import load_data, load_teacher
    from mimic.io import copy_file
    from mimic.stages.pretrain import plan_pretrain

    cfg = config(args)
    init = load_teacher(args.init) if args.init else None
    run = run_stage(cfg, plan_pretrain(cfg, load_data(cfg), init=init, clean=args.clean_subset, progress=not args.quiet),
                    cache_of(args))
    copy_file(run.path("encoder"), args.out)
    say(args, f"{'fine-tuned' if init else 'clean'} encoder: {args.out} ({run.manifest['fingerprint'][:12]})")
    return {"path": args.out, **_summary(run)}


def _summary(run: Any) -> dict:
    """What a stage command reports: the stage's manifest (minus file names), key, reuse and time."""
    return {**{k: v for k, v in run.manifest.items() if k not in ("files", "seconds")}, "stage": run.stage,
            "key": run.key, "cached": run.cached, "seconds": run.seconds}


def cmd_fingerprint(args: argparse.Namespace) -> dict:
    from mimic.inputs import admit_teacher

    t = admit_teacher(args.path, config(args).limits)
    say(args, t.fingerprint)
    return {"path": args.path, "fingerprint": t.fingerprint, "sha256": t.sha256, "arch": t.loaded.spec.name,
            "layout": t.loaded.layout, "ignored": list(t.loaded.ignored)}


def _clean(args: argparse.Namespace, cfg: Any):
    """The clean set D, its content hash, and a record of where it came from."""
    from mimic.inputs import clean_subset, clean_version, load_data, require_clean_size

    ds = load_data(cfg)
    clean = clean_subset(cfg, ds)
    if getattr(args, "need_batch", False):
        require_clean_size(cfg, clean, cfg.data.source)
    ver = clean_version(clean)
    record = {"source": cfg.data.source, "dataset_version": ds.version, "clean_version": ver, "clean_images": len(clean),
              "skipped": ds.skipped}
    return clean, ver, record


def cmd_mi(args: argparse.Namespace) -> dict:
    from mimic.inputs import admit_teacher
    from mimic.stages.mi import plan_mi

    cfg = config(args)
    t = admit_teacher(args.teacher, cfg.limits)
    clean, ver, data = _clean(args, cfg)
    run = run_stage(cfg, plan_mi(cfg, t.loaded, t.fingerprint, clean, ver), cache_of(args))
    export(run, Path(args.out))
    for s in run.manifest["stages"]:
        say(args, f"{s}: MI {run.manifest['mi'][s]:.4f}  weight {run.manifest['weights'][s]:.1f}")
    return {**{k: run.manifest[k] for k in ("stages", "mi", "weights", "network")}, "data": data, **_summary(run)}


def cmd_distill(args: argparse.Namespace) -> dict:
    from mimic.inputs import admit_teacher
    from mimic.io import read_json
    from mimic.stages.distill import plan_distill
    from mimic.stages.mi import plan_mi, weights_of

    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
        args.sets = [*args.sets, f"distill.nproc={args.nproc}"]
    cfg = config(args)
    args.need_batch = True  # refuse a too-small clean set before the MI stage writes anything
    clean, ver, data = _clean(args, cfg)
    t = admit_teacher(args.teacher, cfg.limits)
    cache = cache_of(args)
    if args.mi:
        try:
            weights = weights_of(read_json(args.mi))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{args.mi}: not an mi.json written by `mimic mi` ({type(exc).__name__})") from None
    else:
        weights = weights_of(run_stage(cfg, plan_mi(cfg, t.loaded, t.fingerprint, clean, ver), cache))
    run = run_stage(cfg, plan_distill(cfg, t.loaded, t.fingerprint, clean, ver, weights, progress=not args.quiet), cache)
    export(run, Path(args.out))
    say(args, f"student: {Path(args.out) / 'student.pt'} ({run.manifest['fingerprint'][:12]})")
    return {"teacher": t.info(), "data": data, "student": str(Path(args.out) / "student.pt"), **_summary(run)}


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from mimic.inputs import admit_teacher, load_data, resolve_attack
    from mimic.stages.evaluate import plan_evaluate

    cfg = config(args)
    ds = load_data(cfg)
    attack = resolve_attack(None, args.trigger, args.target_class, checkpoints=cfg.limits)  # --trigger NPZ|PT
    cache, res = cache_of(args), {}
    for item in args.encoder:
        name, _, path = item.rpartition("=")
        name = name or Path(path).stem
        enc = admit_teacher(path, cfg.limits)
        run = run_stage(cfg, plan_evaluate(cfg, name, enc.loaded, enc.fingerprint, ds, attack), cache)
        if args.out:
            export(run, Path(args.out) / name)
        res[name] = run.manifest["probes"]
        for probe, r in res[name].items():
            say(args, f"{name:>12} {probe:>6}: CA {fmt(r['ca'])}%  ASR {fmt(r['asr'])}%")
    out = {"encoders": res, "target_class": attack.target}
    if args.metrics:
        from mimic.io import write_json

        # CA/ASR and the target only: `dvc metrics diff` shows what changed in the numbers and nothing else
        # (seconds and the environment go to --json)
        write_json(args.metrics, out)
    return out


def cmd_results(args: argparse.Namespace) -> dict:
    """The DVC pipeline's last stage: the audit's results.json from the stage outputs of earlier stages."""
    from mimic.audit import AuditRequest, run_audit
    from mimic.io import write_json
    from mimic.stages.common import replay

    cfg = config(args)
    req = AuditRequest(teacher=args.teacher, data=cfg.data.source, eval_data=args.eval_data, trigger=args.trigger,
                       target=args.target_class)
    res = run_audit(cfg, req, root=args.cache, out_dir=args.out, runner=replay(args.stages), progress=False)
    if args.metrics:
        # the verdict and CA/ASR only: `dvc metrics diff` shows what changed in the outcome and nothing
        # else (the scan's PL1, timings and the environment are in results.json)
        keys = ("teacher_ca", "teacher_asr", "student_ca", "student_asr")
        write_json(args.metrics, {"verdict": int(res["verdict"]["passed"]), **{k: res[k] for k in keys},
                                  "probes": res["probes"]})
    say(args, table(res))
    return res


# ---------------------------------------------------------------------------------------------


DATA_HELP = "dataset: synthetic, PATH.npz, an image folder, torchvision:NAME:ROOT"


def cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default="runs/cache", metavar="DIR", help="the stage cache: ROOT/<stage>/<key>/ (default: runs/cache)")


def register(sub: Any) -> None:
    from mimic.cli import zoo

    data_help = DATA_HELP

    p = add_command(sub, "demo", cmd_demo, help="clean encoder -> BadEncoder teacher -> MIMIC student, with a CA/ASR table")
    p.add_argument("--data", metavar="SRC", help="dataset (default: the built-in synthetic set); a real dataset "
                   "selects the demo-data profile")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default: runs/demo)")
    common(p)

    p = add_command(sub, "data", cmd_data, help="materialise the dataset (data.source) as one NPZ, for the DVC pipeline")
    p.add_argument("--out", required=True, metavar="PATH", help="the NPZ to write (x_train, y_train, x_test, y_test)")
    common(p)

    p = add_command(sub, "teacher", cmd_teacher, help="the pipeline's teacher: build the demo teacher or import teacher.source")
    p.add_argument("--data", metavar="SRC", help=data_help)
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the teacher (mimic .pt)")
    cache_arg(p)
    common(p)

    p = add_command(sub, "pretrain", cmd_pretrain, help="SimCLR pre-training of a clean encoder")
    p.add_argument("--data", metavar="SRC", help=data_help)
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the encoder (.pt or .safetensors)")
    p.add_argument("--init", metavar="PATH", help="start from this encoder's weights (SimCLR fine-tuning)")
    p.add_argument("--clean-subset", action="store_true",
                   help="train on the defender's clean set (data.clean_size stratified images)")
    cache_arg(p)
    common(p)

    zoo.register(sub)

    from mimic.cli.scan import register as register_scan

    register_scan(sub)

    p = add_command(sub, "fingerprint", cmd_fingerprint, help="content fingerprint of an encoder checkpoint")
    p.add_argument("path", metavar="PATH")
    common(p)

    p = add_command(sub, "mi", cmd_mi, help="per-stage mutual information and MIMIC weights")
    p.add_argument("--teacher", required=True, metavar="PATH")
    p.add_argument("--data", metavar="SRC", help=data_help)
    p.add_argument("--out", required=True, metavar="DIR", help="writes mi.json, mi_stages.json, mi.png, stage.json")
    cache_arg(p)
    common(p)

    p = add_command(sub, "distill", cmd_distill, help="MIMIC distillation into an empty student")
    p.add_argument("--teacher", required=True, metavar="PATH")
    p.add_argument("--data", metavar="SRC", help=data_help)
    p.add_argument("--mi", metavar="JSON", help="mi.json from `mimic mi` (default: run the MI stage first)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes student.pt, losses.json, losses.png, stage.json")
    p.add_argument("--nproc", type=int, metavar="N", help="distil on N data-parallel processes (DDP: gloo on CPU, "
                   "NCCL on CUDA, one GPU each; sets distill.nproc)")
    cache_arg(p)
    common(p)

    p = add_command(sub, "evaluate", cmd_evaluate, help="CA / ASR of encoders with the same downstream probe")
    p.add_argument("--encoder", action="append", required=True, metavar="[NAME=]PATH", help="an encoder (repeatable)")
    p.add_argument("--data", metavar="SRC", help=data_help)
    p.add_argument("--trigger", metavar="NPZ|PT", help="trigger NPZ, or a teacher checkpoint that carries its trigger")
    p.add_argument("--target-class", type=int, metavar="K")
    p.add_argument("--out", metavar="DIR", help="writes NAME/metrics.json and NAME/stage.json per encoder")
    p.add_argument("--metrics", metavar="JSON", help="also write CA/ASR per encoder and probe alone, for `dvc metrics` "
                   "(--json adds seconds and the environment)")
    cache_arg(p)
    common(p)

    p = add_command(sub, "results", cmd_results, help="assemble an audit's results.json from its stage outputs (DVC)")
    p.add_argument("--teacher", required=True, metavar="PATH")
    p.add_argument("--data", metavar="SRC", help="the clean data (default: data.source)")
    p.add_argument("--eval-data", metavar="SRC", help="labelled downstream data (default: --data)")
    p.add_argument("--trigger", metavar="NPZ", help="trigger file the ASR was measured with (default: the teacher's)")
    p.add_argument("--target-class", type=int, metavar="K")
    p.add_argument("--stages", nargs="+", required=True, metavar="DIR", help="stage output directories (stage.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes results.json, student.safetensors, plots")
    p.add_argument("--metrics", metavar="JSON", help="also write CA/ASR (and the verdict) for `dvc metrics`")
    p.add_argument("--exit-zero", action="store_true", help="exit 0 on a rejected verdict (a DVC stage records it in "
                   "--metrics and results.json instead of failing the pipeline)")
    cache_arg(p)
    common(p)
