"""The ``mimic`` command line.

User errors (bad files, bad data, bad params, diverged training) print one line on stderr and
exit with status 2; an interrupted run exits 130 and resumes when the same command runs again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from mimic.errors import ConfigError, MimicError

log = logging.getLogger("mimic")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parameters")
    g.add_argument("--params", metavar="FILE", help="params.yaml to read (default: the built-in defaults)")
    g.add_argument("--profile", metavar="NAME", help="a named profile of params.yaml (e.g. tiny, gpu)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE", help="override one parameter (repeatable)")
    g.add_argument("--device", help="auto | cpu | cuda[:N] (overrides the 'device' param)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's, one per core); "
                   "CPU results are bit-identical only at the same thread count")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info lines")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _data_arg(p: argparse.ArgumentParser, required: bool = False, help_: str = "dataset: synthetic, PATH.npz, an image folder, torchvision:NAME:ROOT") -> None:
    p.add_argument("--data", required=required, metavar="SRC", help=help_)


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--store", metavar="URI", help="where sanitized students go: a directory or s3://bucket/prefix "
                   "(default: $MIMIC_STORE, else runs/store); S3 credentials/endpoint from the AWS_* variables")
    g.add_argument("--cache", default="runs/cache", metavar="DIR", help="content-addressed stage outputs (default: runs/cache)")
    g.add_argument("--no-track", action="store_true", help="skip MLflow logging and the registry gate")
    g.add_argument("--retries", type=int, metavar="N", help="retries of the network steps (S3, MLflow; default 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimic", description="Audit self-supervised image encoders for backdoors and sanitize them with MIMIC.")
    from mimic import __version__

    parser.add_argument("--version", action="version", version=f"mimic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="clean encoder -> BadEncoder teacher -> MIMIC student, with a CA/ASR table")
    _data_arg(p, help_="dataset (default: the built-in synthetic set); a real dataset selects the demo-data profile")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory (default: runs/demo)")
    _common(p)

    p = sub.add_parser("audit", help="audit a teacher (Prefect flow): MI -> distillation -> CA/ASR -> store -> MLflow registry gate")
    p.add_argument("--teacher", required=True, metavar="PATH|S3URI", help="the encoder checkpoint to audit (a path or s3://bucket/key)")
    _data_arg(p, required=True, help_="clean images for distillation (synthetic, PATH.npz, folder, torchvision:NAME:ROOT)")
    p.add_argument("--eval-data", metavar="SRC", help="labelled downstream data for CA/ASR (default: --data)")
    p.add_argument("--trigger", metavar="NPZ", help="trigger file (BadEncoder layout) to measure ASR with")
    p.add_argument("--target-class", type=int, metavar="K", help="the attack's target class, to measure ASR")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/audits/<fingerprint>)")
    _pipeline_args(p)
    _common(p)

    p = sub.add_parser("watch", help="scheduled audits: audit every new teacher under a directory or s3:// prefix")
    p.add_argument("location", metavar="DIR|S3PREFIX", help="where incoming checkpoints arrive")
    _data_arg(p, required=True, help_="clean images for distillation")
    p.add_argument("--eval-data", metavar="SRC", help="labelled downstream data for CA/ASR (default: --data)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="run one tick now and exit")
    when.add_argument("--cron", metavar="EXPR", help='a tick now, then on a cron schedule, e.g. "*/15 * * * *" '
                      "(served as a Prefect deployment when PREFECT_API_URL points at a Prefect server)")
    p.add_argument("--max-ticks", type=int, metavar="N", help="with --cron and no Prefect server: stop after N ticks")
    p.add_argument("--ledger", default="runs/watch", metavar="DIR", help="which fingerprints were audited (default: runs/watch)")
    p.add_argument("--out-root", default="runs/audits", metavar="DIR", help="audit outputs go to DIR/<fingerprint> (default: runs/audits)")
    _pipeline_args(p)
    _common(p)

    p = sub.add_parser("data", help="materialise the dataset (data.source) as one NPZ, for the DVC pipeline")
    p.add_argument("--out", required=True, metavar="PATH", help="the NPZ to write (x_train, y_train, x_test, y_test)")
    _common(p)

    p = sub.add_parser("teacher", help="the pipeline's teacher: build the demo BadEncoder teacher or import teacher.source")
    _data_arg(p, help_="dataset for the demo teacher (default: data.source)")
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the teacher (mimic .pt)")
    p.add_argument("--work", metavar="DIR", help="checkpoints and the clean encoder (default: next to --out)")
    _common(p)

    p = sub.add_parser("pretrain", help="SimCLR pre-training of a clean encoder")
    _data_arg(p)
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the encoder (.pt or .safetensors)")
    p.add_argument("--work", metavar="DIR", help="checkpoint directory (default: next to --out)")
    p.add_argument("--init", metavar="PATH", help="start from this encoder's weights (SimCLR fine-tuning) instead of a fresh one")
    p.add_argument("--clean-subset", action="store_true",
                   help="train on the defender's clean set (data.clean_size stratified images) instead of the training split")
    _common(p)

    p = sub.add_parser("attack", help="make backdoored encoders (for tests and demos)")
    asub = p.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    b = asub.add_parser("badencoder", help="BadEncoder: trigger -> reference alignment")
    b.add_argument("--clean", required=True, metavar="PATH", help="the clean encoder to backdoor")
    _data_arg(b)
    b.add_argument("--out", required=True, metavar="PATH", help="where to write the backdoored encoder")
    b.add_argument("--trigger-out", metavar="NPZ", help="also write the trigger in BadEncoder's NPZ layout")
    b.add_argument("--work", metavar="DIR", help="checkpoint directory (default: next to --out)")
    _common(b)

    p = sub.add_parser("fingerprint", help="content fingerprint of an encoder checkpoint")
    p.add_argument("path", metavar="PATH")
    _common(p)

    p = sub.add_parser("mi", help="per-stage mutual information and MIMIC weights")
    p.add_argument("--teacher", required=True, metavar="PATH")
    _data_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="writes mi.json and mi.png here")
    _common(p)

    p = sub.add_parser("distill", help="MIMIC distillation into an empty student")
    p.add_argument("--teacher", required=True, metavar="PATH")
    _data_arg(p)
    p.add_argument("--mi", metavar="JSON", help="mi.json from `mimic mi` (default: run the MI stage first)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes student.pt, losses.json, losses.png here")
    _common(p)

    p = sub.add_parser("evaluate", help="CA / ASR of encoders with the same downstream probe")
    p.add_argument("--encoder", action="append", required=True, metavar="[NAME=]PATH", help="an encoder to evaluate (repeatable)")
    _data_arg(p)
    p.add_argument("--trigger", metavar="NPZ|PT", help="trigger NPZ, or a teacher checkpoint that carries its trigger")
    p.add_argument("--target-class", type=int, metavar="K")
    _common(p)
    return parser


def _config(args: argparse.Namespace, extra: dict | None = None, default_profile: str | None = None):
    from mimic.config import load_config

    sets = list(args.sets)
    if getattr(args, "device", None):
        sets.append(f"device={args.device}")
    if getattr(args, "data", None):
        extra = {**(extra or {}), "data": {"source": args.data}}
    return load_config(args.params, args.profile or default_profile, sets, extra)


def _emit(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        from mimic.pipeline import write_json

        write_json(args.json, result)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _table(res: dict) -> str:
    rows = [("encoder", "CA %", "ASR %")]
    for who in ("clean", "teacher", "student"):
        if f"{who}_ca" in res:
            rows.append((who, _fmt(res[f"{who}_ca"]), _fmt(res.get(f"{who}_asr"))))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    weights = ", ".join(f"{k} {v:.0f} (MI {res['mi'][k]:.3f})" for k, v in res["weights"].items())
    lines.append(f"MI weights ({res.get('mi_network', 'teacher')}): {weights}")
    lines.append(f"probe: {res['probe']}, target class {res.get('target_class')}, {res['seconds']:.0f} s")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> dict:
    from mimic.pipeline import demo

    real = args.data is not None and args.data != "synthetic"
    cfg = _config(args, default_profile="demo-data" if real else None)
    res = demo(cfg, Path(args.out), progress=not args.quiet)
    print(_table(res))
    return res


def _store_uri(args: argparse.Namespace) -> str | None:
    import os

    return args.store or os.environ.get("MIMIC_STORE") or None


def _check_source(src: str | None, what: str) -> None:
    from mimic.errors import DataError

    if src and src != "synthetic" and not src.startswith(("torchvision:", "s3://")) and not Path(src).exists():
        raise DataError(f"{what} {src}: no such file or directory")


def cmd_audit(args: argparse.Namespace) -> dict:
    cfg = _config(args)
    _check_source(args.data, "--data")
    _check_source(args.eval_data, "--eval-data")
    from mimic.workspace import describe_data, describe_teacher

    # refuse unsafe teachers and unusable data here, in one line, before any orchestration starts
    if not args.teacher.startswith("s3://"):
        describe_teacher(args.teacher)
    describe_data(cfg, args.data)
    from flows.audit import audit_flow

    if args.quiet and not args.no_track:
        _quiet_mlflow()
    with _quiet_tracebacks():
        res = audit_flow(teacher=args.teacher, data=args.data, params=cfg.to_dict(), out=args.out, eval_data=args.eval_data,
                         trigger=args.trigger, target=args.target_class, store=_store_uri(args), root=args.cache,
                         track=not args.no_track, network_retries=args.retries, progress=not args.quiet)
    print(_table(res))
    reused = [k for k, v in res["cached"].items() if v]
    print(f"verdict: {res['verdict']['verdict']} ({res['verdict']['reason']})")
    if reused:
        print(f"reused cached steps: {', '.join(reused)}")
    print(f"sanitized student: {res['student']['file']} -> {res['store']['student_uri']}")
    if "mlflow" in res:
        reg = res["mlflow"]["registry"]
        print(f"MLflow run {res['mlflow']['run_id']} ({res['mlflow']['tracking_uri']}); model {reg['name']} version {reg['version']}"
              + (f", alias '{reg['alias']}'" if reg["alias_moved"] else f", alias '{reg['alias']}' not moved"))
    return res


def _quiet_mlflow() -> None:
    """MLflow installs its own INFO handler when imported; import it now and keep it to warnings."""
    import mlflow  # noqa: F401 - configures the "mlflow" logger

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def cmd_watch(args: argparse.Namespace) -> dict:
    cfg = _config(args)
    _check_source(args.data, "--data")
    _check_source(args.eval_data, "--eval-data")
    from flows.watch import watch_flow

    if args.quiet and not args.no_track:
        _quiet_mlflow()
    kwargs = dict(location=args.location, data=args.data, params=cfg.to_dict(), ledger=args.ledger, eval_data=args.eval_data,
                  store=_store_uri(args), root=args.cache, out_root=args.out_root, track=not args.no_track,
                  network_retries=args.retries, progress=False)
    if args.cron:
        return _serve_watch(args, watch_flow, kwargs)
    with _quiet_tracebacks():
        res = watch_flow(**kwargs)
    _print_tick(res)
    return res


def _print_tick(res: dict) -> None:
    for a in res["audited"]:
        print(f"audited {a['uri']} ({a['fingerprint'][:12]}): {a['verdict']}, student CA {_fmt(a['student_ca'])} ASR {_fmt(a['student_asr'])}")
    for a in res["skipped"]:
        print(f"already audited: {a['uri']} ({a['fingerprint'][:12]})")
    for a in res["refused"]:
        print(f"refused: {a['uri']}: {a['reason']}")
    for a in res["failed"]:
        print(f"failed: {a['uri']}: {a['error']}")
    print(f"{len(res['audited'])} audited, {len(res['skipped'])} already seen, {len(res['refused'])} refused, {len(res['failed'])} failed")


def _serve_watch(args: argparse.Namespace, watch_flow, kwargs: dict) -> dict:
    """``--cron``: with a Prefect server (``PREFECT_API_URL``) serve a scheduled deployment; without one
    (Prefect's local mode cannot schedule) run a tick now and then at each time of the schedule here."""
    import os
    from datetime import datetime


    try:
        from cronsim import CronSim, CronSimError

        CronSim(args.cron, datetime.now())
    except CronSimError as exc:
        raise ConfigError(f"--cron {args.cron!r}: not a cron expression ({exc})") from None
    if os.environ.get("PREFECT_API_URL"):
        print(f"serving deployment mimic-watch on {args.location}, schedule {args.cron!r}, via {os.environ['PREFECT_API_URL']}")
        watch_flow.serve(name="mimic-watch", cron=args.cron, parameters=kwargs, print_starting_message=not args.quiet)
        return {"served": True}
    print(f"no Prefect server configured (PREFECT_API_URL): scheduling {args.cron!r} here; Ctrl-C to stop")
    ticks = []
    schedule = CronSim(args.cron, datetime.now().astimezone())
    while True:
        with _quiet_tracebacks():
            res = watch_flow(**kwargs)
        _print_tick(res)
        ticks.append({k: len(v) for k, v in res.items() if isinstance(v, list)})
        if args.max_ticks and len(ticks) >= args.max_ticks:
            return {"ticks": ticks}
        now = datetime.now().astimezone()
        nxt = next(schedule)
        while nxt <= now:
            nxt = next(schedule)
        print(f"next tick at {nxt:%Y-%m-%d %H:%M %Z}")
        time.sleep((nxt - now).total_seconds())


class _DropMimicTracebacks(logging.Filter):
    """Prefect logs task/flow failures with a traceback; for user errors (MimicError) one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MimicError):
            record.exc_info = None
            record.exc_text = None
            first = " ".join(record.getMessage().split("\n")[0].split())
            if str(exc).split("\n")[0] not in first:
                first = f"{first} ({type(exc).__name__}: {' '.join(str(exc).split())})"
            record.msg, record.args = first, ()
        return True


@contextlib.contextmanager
def _quiet_tracebacks():
    flt = _DropMimicTracebacks()
    loggers = [logging.getLogger(n) for n in ("prefect", "prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def cmd_data(args: argparse.Namespace) -> dict:
    from mimic.pipeline import stage_data

    res = stage_data(_config(args), Path(args.out))
    print(f"data: {res['path']} ({res['train']} train / {res['test']} test images, {res['classes']} classes)")
    return res


def cmd_teacher(args: argparse.Namespace) -> dict:
    from mimic.pipeline import stage_teacher

    cfg = _config(args)
    out = Path(args.out)
    res = stage_teacher(cfg, out, Path(args.work or out.parent / f".{out.stem}.work"), data_source=args.data, progress=not args.quiet)
    print(f"teacher: {res['path']} ({res['fingerprint'][:12]}, from {res['source']})")
    return res


def cmd_pretrain(args: argparse.Namespace) -> dict:
    from mimic.pipeline import git_revision, stage_pretrain
    from mimic.runtime import environment, resolve_device

    cfg = _config(args)
    out = Path(args.out)
    res = stage_pretrain(cfg, out, Path(args.work or out.parent / f".{out.name}.work"), progress=not args.quiet,
                         init=Path(args.init) if args.init else None, clean=args.clean_subset)
    what = "fine-tuned encoder" if args.init else "clean encoder"
    print(f"{what}: {res['path']} ({res['fingerprint'][:12]})")
    return {**res, "environment": {**environment(resolve_device(cfg.device)), "seed": cfg.seed, "git": git_revision()}}


def cmd_attack(args: argparse.Namespace) -> dict:
    from mimic.checkpoints import load_encoder
    from mimic.pipeline import attack_info, stage_attack

    cfg = _config(args)
    out = Path(args.out)
    res = stage_attack(cfg, Path(args.clean), out, Path(args.work or out.parent / f".{out.name}.work"), progress=not args.quiet)
    if args.trigger_out:
        trigger, _ = attack_info(load_encoder(out))
        assert trigger is not None
        trigger.save_npz(args.trigger_out)
    print(f"backdoored encoder: {res['path']} ({res['fingerprint'][:12]}), target class {cfg.attack.target_class}")
    return res


def cmd_fingerprint(args: argparse.Namespace) -> dict:
    from mimic.checkpoints import load_encoder
    from mimic.fingerprint import fingerprint_encoder

    loaded = load_encoder(args.path)
    fp = fingerprint_encoder(loaded.encoder)
    print(fp)
    return {"path": args.path, "fingerprint": fp, "arch": loaded.spec.name, "layout": loaded.layout, "ignored": list(loaded.ignored)}


def cmd_mi(args: argparse.Namespace) -> dict:
    from mimic.checkpoints import load_encoder
    from mimic.pipeline import clean_subset, load_data, stage_mi
    from mimic.workspace import clean_version

    cfg = _config(args)
    ds = load_data(cfg)
    clean = clean_subset(cfg, ds)
    res = stage_mi(cfg, load_encoder(args.teacher), clean, Path(args.out), data_version=clean_version(clean))
    for s in res["stages"]:
        print(f"{s}: MI {res['mi'][s]:.4f}  weight {res['weights'][s]:.1f}")
    from mimic.pipeline import write_json

    # one row per stage: the shape `dvc plots` reads
    write_json(Path(args.out) / "mi_stages.json", {"stages": [{"stage": s, "mi": res["mi"][s], "weight": res["weights"][s]} for s in res["stages"]]})
    return res


def cmd_distill(args: argparse.Namespace) -> dict:
    from mimic.checkpoints import load_encoder
    from mimic.errors import DataError
    from mimic.fingerprint import fingerprint_encoder
    from mimic.pipeline import clean_subset, git_revision, load_data, stage_distill, stage_mi
    from mimic.runtime import environment, resolve_device
    from mimic.workspace import clean_version

    cfg = _config(args)
    device = resolve_device(cfg.device)
    ds = load_data(cfg)
    teacher = load_encoder(args.teacher)
    clean = clean_subset(cfg, ds)
    if len(clean) < max(cfg.distill.batch_size, 2):  # refuse before the MI stage writes anything
        raise DataError(f"clean set: {len(clean)} images, fewer than one batch ({cfg.distill.batch_size}); "
                        "add images or lower distill.batch_size")
    out = Path(args.out)
    if args.mi:
        try:
            mi = json.loads(Path(args.mi).read_text())
            weights = [float(mi["weights"][s]) for s in mi["stages"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{args.mi}: not an mi.json written by `mimic mi` ({type(exc).__name__})") from None
    else:
        mi = stage_mi(cfg, teacher, clean, out, data_version=clean_version(clean))
        weights = [mi["weights"][s] for s in mi["stages"]]
    res = stage_distill(cfg, teacher, clean, weights, out, out / "work", data_version=clean_version(clean), progress=not args.quiet)
    print(f"student: {res['path']} ({res['fingerprint'][:12]})")
    return {
        **res,
        "teacher": {"path": args.teacher, "fingerprint": fingerprint_encoder(teacher.encoder), "arch": teacher.spec.name,
                    "layout": teacher.layout},
        "data": {"source": cfg.data.source, "version": ds.version, "clean_version": clean_version(clean),
                 "clean_images": len(clean), "skipped": ds.skipped},
        "environment": {**environment(device), "seed": cfg.seed, "git": git_revision()},
    }


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from mimic.checkpoints import load_encoder
    from mimic.pipeline import attack_info, load_data, stage_evaluate
    from mimic.triggers import Trigger

    cfg = _config(args)
    encoders = {}
    for item in args.encoder:
        name, _, path = item.rpartition("=")
        encoders[name or Path(path).stem] = load_encoder(path)
    trigger, target = None, args.target_class
    if args.trigger:
        if args.trigger.endswith(".npz"):
            trigger = Trigger.load_npz(args.trigger)
        else:
            trigger, target = attack_info(load_encoder(args.trigger), None, target)
    if trigger is None or target is None:
        trigger, target = None, None
    res = stage_evaluate(cfg, encoders, load_data(cfg), trigger, target)
    for name, probes in res.items():
        for probe, r in probes.items():
            print(f"{name:>12} {probe:>6}: CA {_fmt(r['ca'])}%  ASR {_fmt(r['asr'])}%")
    return {"encoders": res, "target_class": target}


COMMANDS = {
    "demo": cmd_demo,
    "audit": cmd_audit,
    "watch": cmd_watch,
    "data": cmd_data,
    "teacher": cmd_teacher,
    "pretrain": cmd_pretrain,
    "attack": cmd_attack,
    "fingerprint": cmd_fingerprint,
    "mi": cmd_mi,
    "distill": cmd_distill,
    "evaluate": cmd_evaluate,
}


def _set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be at least 1, got {n}")
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="mimic: %(message)s", stream=sys.stderr)
    if args.quiet:  # orchestration chatter (Prefect, MLflow) goes too; their warnings and errors still show
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: r.levelno >= logging.WARNING)
    t0 = time.perf_counter()
    try:
        _set_threads(getattr(args, "threads", None))
        result = COMMANDS[args.command](args)
        if isinstance(result, dict):
            result.setdefault("seconds", round(time.perf_counter() - t0, 2))
            _emit(args, result)
        return 0
    except MimicError as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split())
        print(f"mimic: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if args.debug or "Prefect API server" not in str(exc):
            raise
        print("mimic: error: Prefect's temporary local server did not start in time (a busy machine?); raise "
              "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or point PREFECT_API_URL at a running `prefect server start`",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimic: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as exc:
        if args.debug:
            raise
        print(f"mimic: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
