"""The audit flow: one teacher (path or ``s3://`` URI) in, a sanitized (or rejected) student out.

    fetch teacher -> admit (refuse unsafe files, check the data) -> DVC: add (and push) the inputs
      -> MLflow: probe, open the run -> mimic.audit.run_audit (scan -> mi -> distill -> scan -> evaluate, each a task
      cached on its stage key; losses and stage numbers logged live) -> results.json + report.html
      -> store the student (sanitized/ or quarantine/) -> MLflow: finish the run, register a passing
      student -> Prefect artifacts and the event ``mimic.audit.<verdict>``

Final states: ``Completed`` for a sanitized student; ``Rejected`` (a FAILED state, the gate's
reason as its message) for a rejected one; ``Failed`` with the error for refusals and errors (the
MLflow run, when open, ends FAILED with it). Every task is bounded by a ``timeouts.*`` key
(``tasks.common.TIMEOUTS``; the stages by ``timeouts.stage``): past it the run fails with one line
naming the task or stage and the key, e.g. ``stage 'distill' exceeded timeouts.stage=86400 s; raise
it with --set timeouts.stage=SECONDS (0 = no limit)``. Calling the flow directly returns the results dict,
or raises :class:`AuditRejected` (its ``results``) / the error; :func:`results_of` reads a state.
Runs in Prefect's local mode with no server configured, or against ``PREFECT_API_URL``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed

from flows.params import AuditInput, Services, Settings
from mimic.audit import AuditInputs, AuditRequest, Runner, prepare, run_audit
from mimic.cache import StageCache
from mimic.config import Config
from mimic.errors import StageTimeout
from mimic.io import write_json
from mimic.report import write_report
from mimic.results import scan_tags
from tasks.common import call, timeout_of
from tasks.data import version_inputs
from tasks.observe import emit, publish
from tasks.registry import model_name, register_student
from tasks.stages import prefect_runner
from tasks.storage import store_student_task
from tasks.teacher import fetch_teacher
from tasks.tracking import LiveRun, fail_run, finish_run, open_run, probe


class AuditRejected(Exception):
    """The gate rejected the student; ``results`` holds the audit's results (written to disk too)."""

    def __init__(self, results: dict) -> None:
        super().__init__(f"rejected: {results['verdict']['reason']}")
        self.results = results


def payload_of(state: Any, carrier: type[BaseException], attr: str) -> dict:
    """The dict a finished flow run returned, also when it failed with ``carrier`` (an exception that
    carries it as ``attr``, so the run ends Failed in Prefect yet its result is kept); raises any other error."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, carrier):
        return getattr(data, attr)
    if isinstance(data, BaseException):
        raise data
    return data


def results_of(state: Any) -> dict:
    """The results dict of a finished audit flow run's state (a rejected one too); raises its error."""
    return payload_of(state, AuditRejected, "results")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@task(name="admit", cache_policy=NO_CACHE, timeout_seconds=timeout_of("admit"))
def admit(cfg: Config, req: AuditRequest, root: str) -> AuditInputs:
    """Refuse an unsafe or unusable teacher and unusable data (one-line reason), load both once."""
    return prepare(cfg, req, root)


def _observed(run: Runner, live: LiveRun | None) -> Runner:
    if live is None:
        return run

    def wrapped(plan):
        res = run(plan)
        live.stage(plan.name, res.manifest)
        return res

    return wrapped


def _inputs_record(audit: AuditInput, x: AuditInputs, versions: dict) -> dict:
    eval_src = audit.eval_data or audit.data
    ds = [{"context": "training", "name": "clean", "source": audit.data, "version": x.clean_version,
           "md5": (versions.get("data") or {}).get("md5")},
          {"context": "evaluation", "name": "eval", "source": eval_src, "version": x.eval_data.version,
           "md5": (versions.get("eval_data") or versions.get("data") or {}).get("md5")}]
    t = x.teacher.info()
    teacher = {"fingerprint": t["fingerprint"], "uri": audit.teacher, "arch": t.get("arch"), "layout": t.get("layout"),
               "dvc_md5": (versions.get("teacher") or {}).get("md5")}
    return {"datasets": ds, "teacher": teacher}


@flow(name="mimic-audit", log_prints=True, validate_parameters=True)
def audit_flow(audit: AuditInput, settings: Settings | None = None, services: Services | None = None,
               out: str | None = None, progress: bool = True) -> dict:
    """Audit one teacher; returns the results dict (also ``out/results.json`` and ``out/report.html``)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    settings, services = settings or Settings(), services or Services()
    retries, root = services.network_retries, services.cache
    cfg = settings.config(audit.data)
    bound = cfg.timeouts  # every task below runs under its timeouts.* key (tasks.common.TIMEOUTS)
    local = call(fetch_teacher, bound, audit.teacher, str(Path(root) / "fetched"), retries)
    req = AuditRequest(teacher=local, data=audit.data, eval_data=audit.eval_data, trigger=audit.trigger,
                       target=audit.target_class, teacher_uri=audit.teacher)
    try:
        x = call(admit, bound, cfg, req, root)
    except StageTimeout as exc:
        logger.error("audit of %s failed: %s", audit.teacher, _one_line(exc))
        emit("failed", None, audit.teacher, {"error": _one_line(exc)})
        raise
    except Exception as exc:
        logger.error("refused %s: %s", audit.teacher, _one_line(exc))
        emit("refused", None, audit.teacher, {"reason": _one_line(exc)})
        raise
    fp = x.teacher.fingerprint
    logger.info("admitted %s: fingerprint %s, clean set %d images", audit.teacher, fp[:12], len(x.clean))
    ids, live = None, None
    try:
        evals = audit.eval_data if audit.eval_data not in (None, audit.data) else None
        versions = call(version_inputs, bound, {"data": audit.data, "eval_data": evals, "teacher": local},
                        {"data": x.data.version, "eval_data": x.eval_data.version},
                        services.dvc_registry, services.dvc_remote)
        name = model_name(cfg.gate.model_name, audit.teacher, fp)
        if services.track:
            call(probe, bound, options={} if retries is None else {"retries": retries})
            tags = {"teacher_fingerprint": fp, "teacher_uri": audit.teacher, "data_version": versions["data_version"],
                    "mimic.registered_model": name, "mimic.progress": "started",
                    "mimic.prefect_flow_run": str(flow_run.get_id() or "")}
            ids = call(open_run, bound, cfg.gate.experiment, f"audit-{fp[:12]}", tags, cfg.to_dict(),
                       _inputs_record(audit, x, versions))
            live = LiveRun(ids["run_id"])
            logger.info("MLflow run %s (%s)", ids["run_id"], ids["tracking_uri"])
        cache = StageCache(root, lock_timeout=cfg.timeouts.lock or None)
        runner = _observed(prefect_runner(cache, timeout_seconds=cfg.timeouts.stage or None,
                                                slot_limit=services.accelerator_limit), live)
        results = run_audit(cfg, req, root=root, out_dir=out, inputs=x, progress=progress, started=t0, runner=runner,
                            on_epoch_end=live.epoch if live else None)
        results["data"].update(data_version=versions["data_version"],
                               dvc={k: v for k, v in versions.items() if k != "data_version"})
        results["prefect"] = {"flow_run_id": str(flow_run.get_id() or ""), "flow_run_name": flow_run.get_name()}
        out_dir = Path(results["out"])
        write_json(out_dir / "results.json", results)  # local results are safe before any network step

        akey, verdict = results["audit_key"], results["verdict"]
        logger.info("verdict: %s (%s)", verdict["verdict"], verdict["reason"])
        meta = {k: results[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "teacher_pl1", "student_pl1",
                                        "verdict", "audit_key")}
        meta.update({"student_fingerprint": results["student"]["fingerprint"], "teacher_uri": audit.teacher,
                     "data_version": versions["data_version"]})
        t = time.perf_counter()
        results["store"] = call(store_student_task, bound, results["student"]["file"], fp, meta, services.store, akey,
                                retries, services.sse, services.kms_key_id)
        results["stage_seconds"]["store"] = round(time.perf_counter() - t, 2)
        if ids is not None:
            t = time.perf_counter()
            results["mlflow"] = {**ids, "registry": {"name": name, "version": None}}
            write_report(results, out_dir)
            write_json(out_dir / "results.json", results)
            model = call(finish_run, bound, ids, results, str(out_dir), results["student"]["file"],
                         x.clean.x[:2].permute(0, 2, 3, 1).numpy(), sorted(live.epochs))
            reg_tags = {"teacher_fingerprint": fp, "teacher_uri": audit.teacher, "data_version": versions["data_version"],
                        "verdict": verdict["verdict"], "verdict_reason": verdict["reason"], "mimic.audit_key": akey, **scan_tags(results)}
            reg = call(register_student, bound, name, cfg.gate.alias, model["model_uri"], ids["run_id"], reg_tags,
                       verdict["passed"])
            results["mlflow"] = {**ids, **model, "registry": reg}
            results["stage_seconds"]["track"] = round(time.perf_counter() - t, 2)
        results["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(out_dir / "results.json", results)
        write_report(results, out_dir)
        results["prefect"]["artifacts"] = call(publish, bound, results)
        write_json(out_dir / "results.json", results)
    except Exception as exc:
        from mimic.errors import TrackingUnavailable

        logger.error("audit of %s failed: %s", audit.teacher, _one_line(exc))
        hung = isinstance(exc, StageTimeout) and exc.setting == "timeouts.service"  # a hung server: do not wait again
        if ids is not None and not isinstance(exc, TrackingUnavailable) and not hung:
            try:
                call(fail_run, bound, ids["run_id"], _one_line(exc))
            except Exception as also:  # noqa: BLE001 - the original error is the one to report
                logger.warning("could not mark MLflow run %s failed: %s", ids["run_id"], _one_line(also))
        emit("failed", fp, audit.teacher, {"error": _one_line(exc)})
        raise
    payload = {k: results.get(k) for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "audit_key")}
    payload.update(reason=verdict["reason"], student_uri=results["store"]["student_uri"], out=results["out"])
    emit(verdict["verdict"], fp, audit.teacher, payload)
    if not verdict["passed"]:
        return Failed(name="Rejected", message=f"rejected: {verdict['reason']}", data=AuditRejected(results))
    return results
