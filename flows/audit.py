"""The audit flow: one teacher in, a sanitized (or rejected) student out.

fetch teacher -> fingerprint -> version data (DVC hash) -> MI -> distill -> evaluate teacher and
student -> results.json -> store the student -> MLflow run -> registry version + gate.

Heavy tasks are cached on content keys, so a repeated audit reuses them (their task state is
``Cached``) and changing one distillation param re-runs only distillation and the student's
evaluation. Runs in Prefect's local mode with no server configured, or against the server in
``PREFECT_API_URL``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow

from mimic.config import config_from_dict
from mimic.pipeline import write_json
from mimic.workspace import assemble_results, audit_key, copy_artifact, export_student
from tasks.analysis import distill_task, evaluate_task, mi_task
from tasks.data import version_data
from tasks.storage import store_student_task
from tasks.teacher import fetch_teacher, fingerprint_teacher
from tasks.tracking import log_audit, register_and_gate

log = logging.getLogger("mimic")


def _cached_run(task: Any, files: tuple[str, ...], **kwargs: Any) -> tuple[dict, bool]:
    """Run a cached task; if its cached result points at files that are gone, refresh the cache."""
    state = task(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not all(result.get(f) and Path(result[f]).exists() for f in files):
        log.info("%s: cached files are gone; recomputing", task.name)
        result = task.with_options(refresh_cache=True)(**kwargs, return_state=True).result()
        cached = False
    return result, cached


def default_out(teacher_fp: str) -> str:
    return f"runs/audits/{teacher_fp[:12]}"


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
    """Audit one teacher (path or ``s3://`` URI) with clean ``data``; returns the results dict.

    ``params`` is ``Config.to_dict()`` of the run's configuration (what is logged is what ran).
    ``network_retries`` overrides the retry count of the S3/MLflow tasks.
    """
    t0 = time.perf_counter()
    cfg = config_from_dict(params)
    net = {} if network_retries is None else {"retries": network_retries}
    seconds: dict[str, float] = {}
    cached: dict[str, bool] = {}

    t = time.perf_counter()
    local = fetch_teacher.with_options(**net)(teacher, str(Path(root) / "teachers"))
    tinfo = fingerprint_teacher(local, trigger, target)
    fp = tinfo["fingerprint"]
    dv = version_data(data, params)
    ev = dv if eval_data in (None, data) else version_data(eval_data, params)
    seconds["identify"] = time.perf_counter() - t

    t = time.perf_counter()
    mi, cached["mi"] = _cached_run(mi_task, ("json", "plot"), teacher_path=local, teacher_fingerprint=fp, data=data,
                                   clean_version=dv["clean_version"], params=params, root=root)
    seconds["mi"] = time.perf_counter() - t
    weights = [mi["weights"][s] for s in mi["stages"]]

    t = time.perf_counter()
    st, cached["distill"] = _cached_run(distill_task, ("student",), teacher_path=local, teacher_fingerprint=fp, data=data,
                                        clean_version=dv["clean_version"], weights=weights, params=params, root=root,
                                        progress=progress)
    seconds["distill"] = time.perf_counter() - t

    evals: dict[str, dict] = {}
    if ev["labelled"]:
        for name, path, efp in (("teacher", local, fp), ("student", st["student"], st["fingerprint"])):
            t = time.perf_counter()
            evals[name], cached[f"evaluate-{name}"] = _cached_run(
                evaluate_task, ("path",), name=name, encoder_path=path, encoder_fingerprint=efp,
                eval_data=eval_data or data, eval_version=ev["dataset_version"], params=params, root=root,
                teacher_path=local, trigger_path=trigger, target=tinfo["target"], trigger_id=tinfo["trigger_id"])
            seconds[f"evaluate-{name}"] = time.perf_counter() - t
    else:
        log.warning("%s has no labelled train/test split: CA/ASR not measured", ev["source"])

    out_dir = Path(out or default_out(fp))
    out_dir.mkdir(parents=True, exist_ok=True)
    akey = audit_key(fp, dv, ev, cfg, {"trigger_id": tinfo["trigger_id"], "target": tinfo["target"]})
    results = assemble_results(cfg, teacher=tinfo, teacher_uri=teacher, data=dv, eval_data=ev, mi=mi, student=st,
                               evals=evals, seconds=seconds, cached=cached, total_seconds=time.perf_counter() - t0,
                               device=cfg.device)
    results["audit_key"] = akey
    artifacts = [copy_artifact(mi["plot"], out_dir), copy_artifact(mi["json"], out_dir), copy_artifact(st["plot"], out_dir),
                 copy_artifact(st["losses"], out_dir)]
    student_file = export_student(st["student"], out_dir / "student.safetensors",
                                  {"teacher_fingerprint": fp, "audit_key": akey, "verdict": results["verdict"]["verdict"]})
    results["student"]["file"] = str(student_file)
    results_path = out_dir / "results.json"
    write_json(results_path, results)  # local results are safe before any network step

    meta = {k: results[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "verdict", "audit_key")}
    meta.update({"student_fingerprint": st["fingerprint"], "teacher_uri": teacher, "data_version": dv["data_version"]})
    t = time.perf_counter()
    # students/<teacher fingerprint>/<audit key>/: audits of one teacher with other params never overwrite each other
    results["store"] = store_student_task.with_options(**net)(str(student_file), fp, meta, store, akey)
    seconds["store"] = time.perf_counter() - t
    write_json(results_path, results)

    if track:
        t = time.perf_counter()
        run = log_audit.with_options(**net)(str(results_path), akey, artifacts + [str(results_path)], st["losses"], str(student_file))
        tags = {"teacher_fingerprint": fp, "teacher_uri": teacher, "data_version": dv["data_version"],
                "verdict": results["verdict"]["verdict"], "verdict_reason": results["verdict"]["reason"], "audit_key": akey}
        reg = register_and_gate.with_options(**net)(run["run_id"], run["model_uri"], tags, results["verdict"]["passed"],
                                                    cfg.gate.model_name, cfg.gate.alias)
        results["mlflow"] = {**run, "registry": reg}
        seconds["track"] = time.perf_counter() - t
    results["stage_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    results["out"] = str(out_dir)
    write_json(results_path, results)
    return results
