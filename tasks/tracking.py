"""MLflow: one live run per audit, opened when the audit starts and closed with its outcome.

    probe (an outage is reported in seconds) -> open_run (config, dataset and teacher inputs)
      -> per-epoch losses and per-stage numbers while the stages run (LiveRun)
      -> finish_run (results, artifacts, the student as a logged model; FINISHED)
      or fail_run (the error as a tag; FAILED)

What is logged is driven by ``results.json``: every number under the top level and the groups in
:data:`METRIC_GROUPS` becomes a metric, every file the audit wrote next to it an artifact, so a
new results field (e.g. a scan's) reaches MLflow without a change here.

Retries, one layer: :func:`probe` is the Prefect task with bounded retries (a down or hung tracking
server is reported within ~30 s); the calls after it use MLflow's own client (its HTTP retries are
``MLFLOW_HTTP_REQUEST_MAX_RETRIES``/``MLFLOW_HTTP_REQUEST_TIMEOUT``); the MLflow tasks themselves are
not retried by Prefect. The tracking URI is MLflow's own resolution (``MLFLOW_TRACKING_URI``, else
``mlflow.db`` in the working directory).
"""

from __future__ import annotations

import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task

from mimic.errors import MimicError, TrackingUnavailable
from tasks.common import NETWORK, timeout_of

log = logging.getLogger("mimic")
PYFUNC = Path(__file__).with_name("pyfunc_student.py")
METRIC_GROUPS = ("probes", "mi", "weights", "scan")  # results groups whose numeric leaves are metrics
NOT_ARTIFACTS = {".safetensors", ".pt", ".pth"}  # the student is logged as a model, not a file
PROBE_TIMEOUT = 5.0
_NETWORK_HINTS = ("max retries exceeded", "connection refused", "failed to establish", "timed out", "connection aborted",
                  "temporarily_unavailable", "503", "502", "504", "remote end closed", "connectionerror")


class TrackingError(MimicError):
    """MLflow refused a request (not an outage): bad URI, permissions, invalid names."""


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


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def result_metrics(results: dict) -> dict[str, float]:
    """The numbers of ``results`` worth a metric: top-level numbers and the numeric leaves of METRIC_GROUPS."""
    out = {k: float(v) for k, v in results.items() if _number(v) and k != "target_class"}
    for group in METRIC_GROUPS:
        if isinstance(results.get(group), dict):
            out.update({f"{group}.{k}": float(v) for k, v in flatten(results[group]).items() if _number(v)})
    return out


@task(name="probe-mlflow", timeout_seconds=timeout_of("probe-mlflow"), **NETWORK)
def probe() -> str:
    """Check that the tracking server answers (http/https URIs; local stores always do); returns the URI."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT).close()
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TrackingUnavailable(f"MLflow at {uri}: health check answered {exc.code}") from None
        except (OSError, TimeoutError) as exc:
            raise TrackingUnavailable(f"MLflow at {uri}: not reachable ({exc})") from None
    return uri


def _experiment(client: Any, name: str) -> str:
    """The experiment's id, created if missing (two audits creating it at once both succeed)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception as exc:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS: another audit created it first
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _dataset(source: str, md5: str | None, version: str, name: str) -> Any:
    """An MLflow dataset entity for a data source; the digest is the DVC md5 when there is one."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        src = resolve_dataset_source(source) if Path(source).exists() or "://" in source else None
    except Exception:  # noqa: BLE001 - no source type for this URI: describe it as code-made data
        src = None
    if src is None:
        src = CodeDatasetSource(tags={"mimic.data": source})
    return MetaDataset(src, name=name, digest=(md5 or version)[:36])._to_mlflow_entity()


@task(name="open-mlflow-run", timeout_seconds=timeout_of("open-mlflow-run"))
def open_run(experiment: str, run_name: str, tags: dict[str, str], params: dict, inputs: dict) -> dict:
    """A RUNNING run with the config, tags, the clean/eval datasets and the teacher as inputs.

    ``inputs``: ``{"datasets": [{"context", "source", "md5", "version", "name"}], "teacher": {"fingerprint",
    "uri", "md5", ...}}``. The teacher becomes an external logged model (its file stays where it is).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Param, RunTag

    with tracking("opening the audit run"):
        client = MlflowClient()
        exp_id = _experiment(client, experiment)
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
        rid = run.info.run_id
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 90):
            client.log_batch(rid, params=flat[i:i + 90])
        datasets = [DatasetInput(_dataset(d["source"], d.get("md5"), d["version"], d["name"]),
                                 [InputTag("mlflow.data.context", d["context"])]) for d in inputs["datasets"]]
        t = inputs["teacher"]
        teacher = mlflow.create_external_model(
            name=f"teacher-{t['fingerprint'][:12]}", source_run_id=rid, experiment_id=exp_id, model_type="teacher",
            tags={"mimic.role": "teacher", **{f"mimic.{k}": str(v) for k, v in t.items() if v is not None}})
        client.log_inputs(rid, datasets=datasets, models=[LoggedModelInput(teacher.model_id)])
        client.log_batch(rid, tags=[RunTag("mimic.teacher_model_id", teacher.model_id)])
    return {"run_id": rid, "experiment_id": exp_id, "teacher_model_id": teacher.model_id,
            "tracking_uri": mlflow.get_tracking_uri()}


class LiveRun:
    """Per-epoch losses and per-stage numbers while the audit runs, with real steps and timestamps.

    Calls MLflow asynchronously (``synchronous=False``): a slow tracking server never slows the
    distillation. A failure is logged once and live logging stops; :func:`finish_run` logs what
    is missing from ``losses.json``.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id, self.epochs, self.broken = run_id, set(), False

    def _log(self, metrics: list[Any] = (), tags: dict[str, str] | None = None) -> None:
        if self.broken:
            return
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        try:
            MlflowClient().log_batch(self.run_id, metrics=list(metrics), tags=[RunTag(k, v) for k, v in (tags or {}).items()],
                                     synchronous=False)
        except Exception as exc:  # noqa: BLE001 - live logging is best effort; the final log is not
            self.broken = True
            log.warning("MLflow live logging stopped: %s", " ".join(str(exc).split())[:200])

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """``on_epoch_end`` of :func:`mimic.audit.run_audit`: one point per loss at step ``epoch``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log([Metric(f"distill.{k}", float(v), now, int(epoch)) for k, v in metrics.items() if _number(v)],
                  {"mimic.progress": f"distill epoch {epoch}"})
        self.epochs.add(int(epoch))

    def stage(self, name: str, manifest: dict) -> None:
        """After each stage: its numbers (MI per stage, CA/ASR per probe) and the progress tag."""
        from mlflow.entities import Metric

        now, nums = int(time.time() * 1000), {}
        if name == "mi":
            nums = {f"mi.{k}": v for k, v in manifest.get("mi", {}).items()}
        elif name.startswith("evaluate-"):
            who = name.removeprefix("evaluate-")
            nums = {f"probes.{who}.{p}.{m}": r[m] for p, r in manifest.get("probes", {}).items() for m in ("ca", "asr")}
        elif name.startswith("scan-"):  # trigger inversion: PL1 and the similarity reached (docs/scan.md)
            who = name.removeprefix("scan-")
            nums = {f"scan.{who}.{k}": manifest.get(k) for k in ("pl1", "similarity")}
        self._log([Metric(k, float(v), now, 0) for k, v in nums.items() if _number(v)], {"mimic.progress": f"{name} done"})


@task(name="finish-mlflow-run", timeout_seconds=timeout_of("finish-mlflow-run"))
def finish_run(ids: dict, results: dict, out_dir: str, student_file: str, example: Any, logged_epochs: list[int]) -> dict:
    """Log the audit's outcome in its run and close it FINISHED; returns the student's logged model."""
    import json

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag
    from mlflow.models import infer_signature

    rid, out = ids["run_id"], Path(out_dir)
    with tracking("logging the audit results"):
        client = MlflowClient()
        mlflow.flush_async_logging()
        losses = out / "losses.json"
        history = json.loads(losses.read_text()).get("history", []) if losses.exists() else []
        now = int(time.time() * 1000)
        missing = [Metric(f"distill.{k}", float(v), now, int(h["epoch"])) for h in history if int(h["epoch"]) not in logged_epochs
                   for k, v in h.items() if k != "epoch" and _number(v)]
        for i in range(0, len(missing), 900):
            client.log_batch(rid, metrics=missing[i:i + 900])
        v = results["verdict"]
        tags = {"verdict": v["verdict"], "verdict_reason": v["reason"], "mimic.audit_key": results["audit_key"],
                "mimic.progress": "done", "student_fingerprint": results["student"]["fingerprint"]}
        tags.update({f"mimic.scan.{k}": str(x) for k, x in flatten(results.get("scan") or {}).items() if not _number(x)})
        client.log_batch(rid, tags=[RunTag(k, str(x)[:5000]) for k, x in tags.items()])
        for p in sorted(out.iterdir()):
            if p.is_file() and p.suffix not in NOT_ARTIFACTS:
                client.log_artifact(rid, str(p))
        with mlflow.start_run(run_id=rid):
            import numpy as np
            import torch

            from mimic.checkpoints import load_encoder
            from mimic.evaluate import extract_features

            x = np.asarray(example, dtype=np.uint8)  # NHWC, as a REST client sends images
            features = extract_features(load_encoder(student_file).encoder.eval(),
                                        torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()).numpy()
            info = mlflow.pyfunc.log_model(
                name="student", python_model=str(PYFUNC), artifacts={"student": student_file},
                code_paths=[str(Path(__import__("mimic").__file__).parent)], input_example=x,
                signature=infer_signature(x, features), model_type="sanitized-encoder",
                pip_requirements=[f"{d}=={_version(d)}" for d in ("torch", "torchvision", "safetensors", "numpy", "pyyaml")],
                tags={"mimic.role": "student", "verdict": v["verdict"], "teacher_fingerprint": results["teacher"]["fingerprint"],
                      "mimic.teacher_model_id": ids["teacher_model_id"], "mimic.audit_key": results["audit_key"]})
            final = [Metric(k, x, now, 0, model_id=info.model_id) for k, x in result_metrics(results).items()]
            for i in range(0, len(final), 900):
                client.log_batch(rid, metrics=final[i:i + 900])
            client.log_batch(rid, tags=[RunTag("mimic.model_uri", info.model_uri), RunTag("mimic.student_model_id", info.model_id)])
    return {"model_uri": info.model_uri, "model_id": info.model_id}


@task(name="fail-mlflow-run", timeout_seconds=timeout_of("fail-mlflow-run"))
def fail_run(run_id: str, error: str) -> None:
    """Close the run FAILED with the one-line error (what a failed audit leaves in MLflow)."""
    from mlflow import MlflowClient

    with tracking("marking the run failed"):
        client = MlflowClient()
        client.set_tag(run_id, "mimic.error", error[:5000])
        client.set_tag(run_id, "mimic.progress", "failed")
        client.set_terminated(run_id, "FAILED")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
