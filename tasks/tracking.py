"""MLflow: one run per audit (config that ran, per-epoch losses, CA/ASR, artifacts, the student as
a model) and the registry gate (a model version per audit; the alias moves only when it passes).

Both tasks are idempotent: a run or model version already made for the same audit key is found
by tag and reused, so a retried or repeated audit never duplicates them. The tracking URI is
MLflow's own resolution: ``MLFLOW_TRACKING_URI`` when set, else a local ``mlflow.db`` store in
the working directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from prefect import task

from mimic.errors import MimicError, TrackingUnavailable
from mimic.results import scan_tags
from tasks.common import NETWORK

PYFUNC = Path(__file__).with_name("pyfunc_student.py")
_NETWORK_HINTS = ("max retries exceeded", "connection refused", "failed to establish", "timed out", "connection aborted",
                  "temporarily_unavailable", "503", "502", "504", "remote end closed", "connectionerror")


class TrackingError(MimicError):
    """MLflow refused a request (not an outage): bad URI, permissions, invalid names."""


@contextlib.contextmanager
def _dropping(logger: str, text: str) -> Iterator[None]:
    """Drop the records of ``logger`` that contain ``text`` (an expected, useless message) meanwhile."""
    def drop(record: logging.LogRecord) -> bool:  # logging takes a plain callable as a filter
        return text not in record.getMessage()

    logging.getLogger(logger).addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(drop)


@contextlib.contextmanager
def tracking(what: str) -> Iterator[None]:
    """Turn MLflow/requests failures into one-line errors: outages retryable, the rest not."""
    try:
        yield
    except MimicError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; classify by content
        text = " ".join(str(exc).split())
        short = text if len(text) < 300 else text[:300] + "..."
        from mlflow import get_tracking_uri

        where = get_tracking_uri()
        if any(h in text.lower() for h in _NETWORK_HINTS) or isinstance(exc, (ConnectionError, TimeoutError)):
            raise TrackingUnavailable(f"MLflow at {where}: {what} failed: {short}") from exc
        raise TrackingError(f"MLflow at {where}: {what} failed: {short}") from exc


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


@task(name="log-mlflow", **NETWORK)
def log_audit(results_path: str, audit_key: str, artifacts: list[str], losses_path: str | None, student_file: str) -> dict:
    """One MLflow run per audit key; returns ``{"run_id", "experiment_id", "model_uri", "reused"}``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    results = json.loads(Path(results_path).read_text())
    cfg = results["config"]
    with tracking("opening the experiment"):
        client = MlflowClient()
        exp = mlflow.set_experiment(cfg["gate"]["experiment"])
        found = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mimic.audit_key` = '{audit_key}' and attributes.status = 'FINISHED'",
            max_results=1)
    if found and found[0].data.tags.get("mimic.model_uri"):
        run = found[0]
        return {"run_id": run.info.run_id, "experiment_id": exp.experiment_id,
                "model_uri": run.data.tags["mimic.model_uri"], "reused": True, "tracking_uri": mlflow.get_tracking_uri()}
    teacher = results["teacher"]
    with tracking("logging the audit run"):
        with mlflow.start_run(experiment_id=exp.experiment_id, run_name=f"audit-{teacher['fingerprint'][:12]}") as run:
            rid = run.info.run_id
            mlflow.set_tags({
                "mimic.audit_key": audit_key, "teacher_fingerprint": teacher["fingerprint"], "teacher_uri": teacher["uri"],
                "data_version": results["data"]["data_version"], "verdict": results["verdict"]["verdict"],
                "verdict_reason": results["verdict"]["reason"], "mimic.version": results["environment"].get("mimic"),
                "mimic.git": str(results["environment"].get("git")), **scan_tags(results),
            })
            mlflow.log_params(flatten(cfg))
            if losses_path and Path(losses_path).exists():
                history = json.loads(Path(losses_path).read_text()).get("history", [])
                metrics = [Metric(f"distill.{k}", float(v), 0, int(h["epoch"]))
                           for h in history for k, v in h.items() if k != "epoch" and isinstance(v, (int, float))]
                for i in range(0, len(metrics), 900):
                    client.log_batch(rid, metrics=metrics[i:i + 900])
            final = {k: results[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr") if results.get(k) is not None}
            for who, probes in results.get("probes", {}).items():
                for probe, m in probes.items():
                    for what in ("ca", "asr"):
                        if m.get(what) is not None:
                            final[f"{who}.{probe}.{what}"] = m[what]
            final.update({f"mi.{k}": v for k, v in results["mi"].items()})
            final.update({f"weight.{k}": v for k, v in results["weights"].items()})
            for who, rec in results.get("scan", {}).items():  # trigger inversion: PL1 per model (docs/scan.md)
                final.update({f"scan.{who}.{k}": float(rec[k]) for k in ("pl1", "similarity") if rec.get(k) is not None})
            final["seconds"] = results["seconds"]
            mlflow.log_metrics(final)
            for a in artifacts:
                if Path(a).exists():
                    mlflow.log_artifact(a)
            mlflow.log_dict({"fingerprint": teacher["fingerprint"], "arch": teacher["arch"], "layout": teacher["layout"],
                             "uri": teacher["uri"]}, "teacher_fingerprint.json")
            import mimic

            # predict takes image arrays of any shape (np.ndarray): MLflow infers no signature by design
            with _dropping("mlflow.pyfunc", "Failed to infer model signature"):
                info = mlflow.pyfunc.log_model(
                    name="student", python_model=str(PYFUNC), artifacts={"student": student_file},
                    code_paths=[str(Path(mimic.__file__).parent)],
                    pip_requirements=[f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}", f"safetensors=={_version('safetensors')}",
                                      f"numpy=={_version('numpy')}", f"pyyaml=={_version('pyyaml')}"],
                )
            mlflow.set_tag("mimic.model_uri", info.model_uri)
    return {"run_id": rid, "experiment_id": exp.experiment_id, "model_uri": info.model_uri, "reused": False,
            "tracking_uri": mlflow.get_tracking_uri()}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@task(name="register-and-gate", **NETWORK)
def register_and_gate(run_id: str, model_uri: str, tags: dict[str, str], passed: bool, model_name: str, alias: str) -> dict:
    """A model version for this audit's run (tags incl. ``verdict``); ``alias`` moves to it only if ``passed``."""
    import mlflow
    from mlflow import MlflowClient

    with tracking("registering the student"):
        client = MlflowClient()
        try:
            client.get_registered_model(model_name)
        except Exception as exc:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
                raise
            client.create_registered_model(model_name, description="Encoders sanitized by mimic (MIMIC distillation)")
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        mv = versions[0] if versions else mlflow.register_model(model_uri, model_name, tags=tags)
        for k, v in tags.items():
            client.set_model_version_tag(model_name, mv.version, k, v)
        if passed:
            client.set_registered_model_alias(model_name, alias, mv.version)
        holder = None
        try:
            holder = client.get_model_version_by_alias(model_name, alias).version
        except Exception:  # noqa: BLE001 - no version holds the alias yet
            holder = None
    return {"name": model_name, "version": str(mv.version), "alias": alias, "alias_version": holder,
            "alias_moved": bool(passed), "tags": tags}
