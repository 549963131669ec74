"""The audit flow: one teacher (path or ``s3://`` URI) in, a sanitized (or rejected) student out.

    fetch teacher -> mimic.audit.run_audit (scan -> mi -> distill -> scan -> evaluate, each a task
    cached on its stage key) -> results.json -> store the student -> MLflow run -> registry version + gate

Runs in Prefect's local mode with no server configured, or against ``PREFECT_API_URL``.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from mimic.audit import AuditRequest, prepare, run_audit
from mimic.cache import StageCache
from mimic.config import config_from_dict
from mimic.io import write_json
from mimic.results import scan_tags
from tasks.data import version_data
from tasks.stages import prefect_runner
from tasks.storage import store_student_task
from tasks.teacher import fetch_teacher
from tasks.tracking import log_audit, register_and_gate


@flow(name="mimic-audit", log_prints=True)
def audit_flow(
    teacher: str,
    data: str,
    params: dict,
    out: str | None = None,
    eval_data: str | None = None,
    trigger: str | None = None,
    target: int | None = None,
    store: str | None = None,
    root: str = "runs/cache",
    track: bool = True,
    network_retries: int | None = None,
    progress: bool = True,
) -> dict:
    """Audit one teacher with clean ``data``; returns the results dict (also written to ``out``).

    ``params`` is ``Config.to_dict()`` of the run's configuration (what is logged is what ran);
    ``network_retries`` sets the retries of the S3 and MLflow steps.
    """
    t0 = time.perf_counter()
    cfg = config_from_dict(params)
    retries = {} if network_retries is None else {"retries": network_retries}
    local = fetch_teacher(teacher, str(Path(root) / "fetched"), network_retries)
    req = AuditRequest(teacher=local, data=data, eval_data=eval_data, trigger=trigger, target=target, teacher_uri=teacher)
    inputs = prepare(cfg, req, root)
    data_version = version_data(data, inputs.data.version)
    cache = StageCache(root, lock_timeout=cfg.timeouts.lock or None)
    results = run_audit(cfg, req, root=root, out_dir=out, inputs=inputs, progress=progress, started=t0,
                        runner=prefect_runner(cache, timeout_seconds=cfg.timeouts.stage or None))
    results["data"]["data_version"] = data_version
    out_dir = Path(results["out"])
    results_path = out_dir / "results.json"
    write_json(results_path, results)  # local results are safe before any network step

    fp, akey = results["teacher"]["fingerprint"], results["audit_key"]
    meta = {k: results[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "teacher_pl1", "student_pl1",
                                    "verdict", "audit_key")}
    meta.update({"student_fingerprint": results["student"]["fingerprint"], "teacher_uri": teacher, "data_version": data_version})
    t = time.perf_counter()
    results["store"] = store_student_task(results["student"]["file"], fp, meta, store, akey, network_retries)
    results["stage_seconds"]["store"] = round(time.perf_counter() - t, 2)
    write_json(results_path, results)

    if track:
        t = time.perf_counter()
        artifacts = [str(out_dir / n) for n in ("mi.png", "mi.json", "losses.png", "losses.json", "results.json",
                                                "trigger.png", "trigger.npz", "student-trigger.png")]
        run = log_audit.with_options(**retries)(str(results_path), akey, artifacts, str(out_dir / "losses.json"),
                                                results["student"]["file"])
        tags = {"teacher_fingerprint": fp, "teacher_uri": teacher, "data_version": data_version,
                "verdict": results["verdict"]["verdict"], "verdict_reason": results["verdict"]["reason"], "audit_key": akey,
                **scan_tags(results)}
        reg = register_and_gate.with_options(**retries)(run["run_id"], run["model_uri"], tags, results["verdict"]["passed"],
                                                        cfg.gate.model_name, cfg.gate.alias)
        results["mlflow"] = {**run, "registry": reg}
        results["stage_seconds"]["track"] = round(time.perf_counter() - t, 2)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(results_path, results)
    return results
