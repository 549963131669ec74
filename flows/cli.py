"""``mimic audit`` and ``mimic watch``: the Prefect fronts, registered into the ``mimic`` command
through the ``mimic.commands`` entry point (see pyproject.toml)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from mimic.cli import add_command, common, say
from mimic.cli.commands import check_source, config, fmt, table
from mimic.errors import ConfigError, MimicError, ServiceUnavailable


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--store", metavar="URI", help="where sanitized students go: a directory or s3://bucket/prefix "
                   "(default: $MIMIC_STORE, else runs/store); S3 credentials/endpoint from the AWS_* variables")
    g.add_argument("--cache", default="runs/cache", metavar="DIR", help="the stage cache (default: runs/cache)")
    g.add_argument("--no-track", action="store_true", help="skip MLflow logging and the registry gate")
    g.add_argument("--retries", type=int, metavar="N", help="retries of the network steps (S3, MLflow; default 3)")
    g.add_argument("--accelerator-limit", metavar="NAME", help="hold a slot of this Prefect global concurrency limit "
                   "while a stage computes (e.g. mimic-accelerator with slots = the GPUs; create it with prefect gcl create)")
    g.add_argument("--sse", choices=("AES256", "aws:kms"), help="S3 server-side encryption of stored students "
                   "(default: $MIMIC_S3_SSE, else the bucket's default)")
    g.add_argument("--sse-kms-key-id", metavar="KEY", help="KMS key id for --sse aws:kms (default: $MIMIC_S3_KMS_KEY_ID)")
    g.add_argument("--dvc-registry", default="runs/dvc", metavar="DIR", help="DVC repository the clean data and a local "
                   "teacher are added to (default: runs/dvc, created without git)")
    g.add_argument("--dvc-remote", metavar="URL", help="push the added inputs to this DVC remote (e.g. s3://bucket/dvc; "
                   "default: $MIMIC_DVC_REMOTE, else the registry's default remote)")


def _settings(args: argparse.Namespace):
    """The flow's Settings: the same params file, profile and overrides the command line built its config from."""
    from flows.params import Settings

    sets = list(args.sets) + ([f"device={args.device}"] if getattr(args, "device", None) else [])
    return Settings(params_file=args.params, profile=args.profile, overrides=sets)


def _services(args: argparse.Namespace):
    from flows.params import Services

    kms = args.sse_kms_key_id or os.environ.get("MIMIC_S3_KMS_KEY_ID") or None
    sse = args.sse or os.environ.get("MIMIC_S3_SSE") or None
    if sse not in (None, "AES256", "aws:kms"):
        raise ConfigError(f"MIMIC_S3_SSE={sse!r}: use AES256 or aws:kms")
    if kms and sse != "aws:kms":
        raise ConfigError("--sse-kms-key-id needs --sse aws:kms")
    return Services(store=args.store or os.environ.get("MIMIC_STORE") or None, sse=sse, kms_key_id=kms, cache=args.cache,
                    track=not args.no_track, dvc_registry=args.dvc_registry,
                    dvc_remote=args.dvc_remote or os.environ.get("MIMIC_DVC_REMOTE") or None, network_retries=args.retries,
                    accelerator_limit=args.accelerator_limit)


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


# MLflow's own HTTP client settings for the calls after the probe (its one retry layer): 3 attempts of
# at most 10 s with ~4 s of backoff, so a tracking server that dies or hangs mid-audit is reported in
# under a minute (MLflow's defaults, 7 retries of 120 s, take many minutes). Variables the user set win;
# prefect.yaml gives work-pool runs the same values.
MLFLOW_CLIENT_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _orchestrated(args: argparse.Namespace) -> Iterator[None]:
    """Around a flow call: one-line user errors in Prefect's logs, quiet MLflow with ``-q``, MLflow's
    client bounded (:data:`MLFLOW_CLIENT_BOUNDS`), and Prefect's local server failing to start
    reported as a service outage."""
    for name, value in MLFLOW_CLIENT_BOUNDS.items():
        os.environ.setdefault(name, value)  # the command is the application: it configures its client
    if args.quiet and not getattr(args, "no_track", True):
        import mlflow  # noqa: F401 - installs its own INFO handler when imported; keep it to warnings

        logging.getLogger("mlflow").setLevel(logging.WARNING)
    if args.quiet:
        logging.getLogger("prefect").setLevel(logging.WARNING)
    flt = _DropMimicTracebacks()
    loggers = [logging.getLogger(n) for n in ("prefect", "prefect.task_runs", "prefect.flow_runs", "prefect.task_engine",
                                              "prefect.flow_engine")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    except RuntimeError as exc:
        if "Prefect API server" not in str(exc):
            raise
        raise ServiceUnavailable("Prefect's temporary local server did not start in time (a busy machine?); raise "
                                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or point PREFECT_API_URL at a running "
                                 "`prefect server start`") from None
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def cmd_audit(args: argparse.Namespace) -> dict:
    from mimic.audit import AuditRequest, prepare

    cfg = config(args)
    check_source(args.data, "--data")
    check_source(args.eval_data, "--eval-data")
    if not args.teacher.startswith("s3://"):  # refuse unsafe teachers and unusable data before orchestration starts
        prepare(cfg, AuditRequest(args.teacher, args.data, args.eval_data, args.trigger, args.target_class), args.cache)
    from flows.audit import audit_flow, results_of
    from flows.params import AuditInput

    services = _services(args)
    with _orchestrated(args):
        state = audit_flow(AuditInput(teacher=args.teacher, data=args.data, eval_data=args.eval_data, trigger=args.trigger,
                                      target_class=args.target_class), _settings(args), services, out=args.out,
                           progress=not args.quiet, return_state=True)
        res = results_of(state)
    say(args, table(res))
    reused = [k for k, v in res["cached"].items() if v]
    if reused:
        say(args, f"reused cached steps: {', '.join(reused)}")
    say(args, f"student ({res['verdict']['verdict']}): {res['student']['file']} -> {res['store']['student_uri']}")
    if "mlflow" in res:
        reg = res["mlflow"]["registry"]
        say(args, f"MLflow run {res['mlflow']['run_id']} ({res['mlflow']['tracking_uri']}); "
            + (f"model {reg['name']} version {reg['version']}, alias '{reg['alias']}'" if reg.get("registered")
               else f"not registered in {reg['name']} (rejected)"))
    say(args, f"report: {res['out']}/report.html")
    return res


def cmd_watch(args: argparse.Namespace) -> dict:
    config(args)  # a one-line error for bad parameters before orchestration starts
    check_source(args.data, "--data")
    check_source(args.eval_data, "--eval-data")
    from flows.watch import excluded_prefixes, outputs_of, tick_of, watch_flow

    if args.deployment and not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("--deployment submits audits to a work pool: set PREFECT_API_URL to the Prefect server its workers poll")
    services = _services(args)
    excluded_prefixes(args.location, outputs_of(services, args.ledger, args.out_root))  # refuse a self-feeding watch now
    kwargs = dict(location=args.location, data=args.data, settings=_settings(args), services=services,
                  ledger=args.ledger, eval_data=args.eval_data, out_root=args.out_root, progress=False,
                  deployment=args.deployment)
    if args.cron:
        return _serve_watch(args, watch_flow, kwargs)
    with _orchestrated(args):
        res = tick_of(watch_flow(**kwargs, return_state=True))
    _print_tick(args, res)
    return res


def _print_tick(args: argparse.Namespace, res: dict) -> None:
    from flows.watch import shown  # names and reasons with control characters escaped: one line each

    for a in res["audited"]:
        scan = a.get("scan") or {}
        say(args, f"audited {shown(a['uri'])} ({a['fingerprint'][:12]}): {a['verdict']}, student CA {fmt(a['student_ca'])} "
            f"ASR {fmt(a['student_asr'])}" + (f" ({a['asr_trigger']} trigger)" if a.get("asr_trigger") else "")
            + (f"; scan: teacher {scan.get('teacher')} (PL1 {a['teacher_pl1']:.4f}), student {scan.get('student')} "
               f"(PL1 {a['student_pl1']:.4f})" if a.get("teacher_pl1") is not None and a.get("student_pl1") is not None else ""))
    for a in res["skipped"]:
        say(args, f"already audited: {shown(a['uri'])} ({a['fingerprint'][:12]})")
    for a in res["refused"]:
        say(args, f"refused: {shown(a['uri'])}: {shown(a['reason'])}")
    for a in res["failed"]:
        say(args, f"failed: {shown(a['uri'])}: {shown(a['error'])}")
    for a in res.get("submitted", []):
        say(args, f"submitted: {shown(a['uri'])} ({a['fingerprint'][:12]}): flow run {a['flow_run']} ({a['state']}"
            + (", resubmitted after a crash" if a["resubmitted"] else "") + ")")
    say(args, f"{len(res['audited'])} audited, {len(res['skipped'])} already seen, {len(res['refused'])} refused, "
        f"{len(res['failed'])} failed")


def _serve_watch(args: argparse.Namespace, watch_flow: Any, kwargs: dict) -> dict:
    """``--cron``: with a Prefect server (``PREFECT_API_URL``) serve a scheduled deployment; without one
    (Prefect's local mode cannot schedule) run a tick now and then at each time of the schedule here."""
    from flows.watch import tick_of
    try:
        from cronsim import CronSim, CronSimError

        CronSim(args.cron, datetime.now())
    except CronSimError as exc:
        raise ConfigError(f"--cron {args.cron!r}: not a cron expression ({exc})") from None
    if os.environ.get("PREFECT_API_URL"):
        say(args, f"serving deployment mimic-watch on {args.location}, schedule {args.cron!r}, via {os.environ['PREFECT_API_URL']}")
        params = {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in kwargs.items()}
        watch_flow.serve(name="mimic-watch", cron=args.cron, parameters=params, print_starting_message=not args.quiet)
        return {"served": True}
    say(args, f"no Prefect server configured (PREFECT_API_URL): scheduling {args.cron!r} here; Ctrl-C to stop")
    ticks: list[dict] = []
    schedule = CronSim(args.cron, datetime.now().astimezone())
    while True:
        with _orchestrated(args):
            res = tick_of(watch_flow(**kwargs, return_state=True))
        _print_tick(args, res)
        ticks.append({k: len(v) for k, v in res.items() if isinstance(v, list)})
        if args.max_ticks and len(ticks) >= args.max_ticks:
            return {"ticks": ticks}
        now = datetime.now().astimezone()
        nxt = next(schedule)
        while nxt <= now:
            nxt = next(schedule)
        say(args, f"next tick at {nxt:%Y-%m-%d %H:%M %Z}")
        time.sleep((nxt - now).total_seconds())


def register(sub: Any) -> None:
    """Entry point ``mimic.commands``: add ``audit`` and ``watch`` to the ``mimic`` command."""
    p = add_command(sub, "audit", cmd_audit, help="audit a teacher (Prefect flow): MI -> distillation -> CA/ASR -> "
                    "store -> MLflow registry gate")
    p.add_argument("--teacher", required=True, metavar="PATH|S3URI", help="the encoder checkpoint to audit")
    p.add_argument("--data", required=True, metavar="SRC", help="clean images (synthetic, PATH.npz, folder, torchvision:NAME:ROOT)")
    p.add_argument("--eval-data", metavar="SRC", help="labelled downstream data for CA/ASR (default: --data)")
    p.add_argument("--trigger", metavar="NPZ", help="trigger file (BadEncoder layout) to measure ASR with")
    p.add_argument("--target-class", type=int, metavar="K", help="the attack's target class, to measure ASR")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/audits/<fingerprint>)")
    _pipeline_args(p)
    common(p)

    p = add_command(sub, "watch", cmd_watch, help="scheduled audits: audit every new teacher under a directory or s3:// prefix")
    p.add_argument("location", metavar="DIR|S3PREFIX", help="where incoming checkpoints arrive")
    p.add_argument("--data", required=True, metavar="SRC", help="clean images for distillation")
    p.add_argument("--eval-data", metavar="SRC", help="labelled downstream data for CA/ASR (default: --data)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="run one tick now and exit")
    when.add_argument("--cron", metavar="EXPR", help='a tick now, then on a cron schedule, e.g. "*/15 * * * *" '
                      "(served as a Prefect deployment when PREFECT_API_URL points at a Prefect server)")
    p.add_argument("--max-ticks", type=int, metavar="N", help="with --cron and no Prefect server: stop after N ticks")
    p.add_argument("--ledger", default="runs/watch", metavar="DIR", help="which fingerprints were audited (default: runs/watch)")
    p.add_argument("--out-root", default="runs/audits", metavar="DIR", help="audit outputs go to DIR/<fingerprint>")
    p.add_argument("--deployment", metavar="FLOW/NAME", help="submit each new teacher as a run of this audit deployment "
                   "(e.g. mimic-audit/audit, on a work pool; needs PREFECT_API_URL) instead of auditing it here; "
                   "one run per teacher and configuration however many watchers see it")
    _pipeline_args(p)
    common(p)


