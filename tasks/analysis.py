"""The heavy steps: per-stage MI, MIMIC distillation, CA/ASR evaluation -- cached on content keys."""

from __future__ import annotations

from prefect import task

from mimic.config import config_from_dict
from mimic.workspace import distill_key, evaluate_key, mi_key, run_distill, run_evaluate, run_mi
from tasks.common import HEAVY, content_cache


@task(name="mutual-information", cache_key_fn=content_cache("mi", lambda c, p: mi_key(c, p["teacher_fingerprint"], p["clean_version"])), **HEAVY)
def mi_task(teacher_path: str, teacher_fingerprint: str, data: str, clean_version: str, params: dict, root: str) -> dict:
    """Per-stage MI of the teacher (or random student) on the clean set; returns paths + weights."""
    return run_mi(config_from_dict(params), teacher_path, data, root, clean_ver=clean_version)


@task(name="distill", cache_key_fn=content_cache("distill", lambda c, p: distill_key(c, p["teacher_fingerprint"], p["clean_version"])), **HEAVY)
def distill_task(
    teacher_path: str, teacher_fingerprint: str, data: str, clean_version: str, weights: list[float], params: dict, root: str,
    progress: bool = True,
) -> dict:
    """MIMIC distillation into a fresh student (GPU when present); returns the student's path + fingerprint."""
    return run_distill(config_from_dict(params), teacher_path, data, weights, root, clean_ver=clean_version, progress=progress)


@task(name="evaluate", task_run_name="evaluate-{name}", cache_key_fn=content_cache(
    "evaluate", lambda c, p: evaluate_key(c, p["encoder_fingerprint"], p["eval_version"], p["trigger_id"], p["target"])), **HEAVY)
def evaluate_task(
    name: str, encoder_path: str, encoder_fingerprint: str, eval_data: str, eval_version: str, params: dict, root: str,
    teacher_path: str | None, trigger_path: str | None, target: int | None, trigger_id: str | None,
) -> dict:
    """CA/ASR of one encoder with the configured probe(s); returns the metrics (and their JSON path)."""
    return run_evaluate(config_from_dict(params), name, encoder_path, eval_data, root, teacher_path=teacher_path,
                        trigger_path=trigger_path, target=target)
