"""End to end with real services on loopback: a Prefect server, an MLflow tracking server, a moto S3
server (the store and the DVC remote). One passing and one rejected `mimic audit`, then what each
service holds; the sanitized model served by `mlflow models serve` answers with embeddings; the
deployments of prefect.yaml register on a process work pool. Slow (minutes): `pytest -m slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest

from services import free_port, open_gate_args, stop_process, venv_program, wait_http

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def servers(tmp_path, s3_env, monkeypatch):
    """A Prefect server and an MLflow server on loopback, with their URLs in the environment."""
    pport, mport = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    prefect = subprocess.Popen([str(venv_program("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(pport)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    mlflow = subprocess.Popen(
        [str(venv_program("mlflow")), "server", "--host", "127.0.0.1", "--port", str(mport), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{pport}/api/health", timeout=180, proc=prefect)
        wait_http(f"http://127.0.0.1:{mport}/health", timeout=180, proc=mlflow)
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{pport}/api")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mport}")
        monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # the environment reaches the subprocesses; this process's Prefect settings were fixed when it
        # first imported prefect (an earlier test's server), so they are pointed at this server too
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{pport}/api"}):
            yield {"bucket": s3_env, "prefect": f"http://127.0.0.1:{pport}/api", "mlflow": f"http://127.0.0.1:{mport}"}
    finally:
        stop_process(mlflow)
        stop_process(prefect)


def _mimic(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mimic.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=1200)


def test_passing_and_rejected_audits_on_real_services(servers, tiny_teachers, tmp_path):
    bucket = servers["bucket"]
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    common = ["--teacher", str(tiny_teachers["teacher"]), "--data", "synthetic", "--profile", "tiny", "--threads", "1",
              "--store", f"s3://{bucket}/models", "--sse", "AES256", "--dvc-remote", f"s3://{bucket}/dvc", "-q"]
    ok = _mimic("audit", *common, *open_gate_args(), "--json", "pass.json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    bad = _mimic("audit", *common, "--set", "gate.max_asr=0", "--set", "gate.max_ca_drop=0", "--json", "-", cwd=tmp_path)
    assert bad.returncode == 3, bad.stderr[-3000:]
    passed, rejected = json.loads((tmp_path / "pass.json").read_text()), json.loads(bad.stdout)
    fp = passed["teacher"]["fingerprint"]
    assert rejected["verdict"]["verdict"] == "rejected" and rejected["teacher"]["fingerprint"] == fp

    # S3: sanitized/ and quarantine/, versions, encryption
    for res, area in ((passed, "sanitized"), (rejected, "quarantine")):
        key = res["store"]["student_uri"].removeprefix(f"s3://{bucket}/")
        assert key.startswith(f"models/{area}/{fp}/")
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["VersionId"] == res["store"]["version_id"] and head["ServerSideEncryption"] == "AES256"
    # DVC remote: the teacher's content, addressed by its md5
    md5 = passed["data"]["dvc"]["teacher"]["md5"]
    s3.head_object(Bucket=bucket, Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")

    # MLflow: one registered model for the teacher, alias on the passing version only, both runs FINISHED
    from mlflow import MlflowClient

    client = MlflowClient(servers["mlflow"])
    name = passed["mlflow"]["registry"]["name"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [passed["mlflow"]["registry"]["version"]]
    assert str(client.get_model_version_by_alias(name, "sanitized").version) == passed["mlflow"]["registry"]["version"]
    for res, verdict in ((passed, "sanitized"), (rejected, "rejected")):
        run = client.get_run(res["mlflow"]["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["verdict"] == verdict
        assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert len(client.get_metric_history(run.info.run_id, "distill.loss")) == res["config"]["distill"]["epochs"]

    # Prefect: flow run states, artifacts, events
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as pc:
        ids = [passed["prefect"]["flow_run_id"], rejected["prefect"]["flow_run_id"]]
        runs = {str(r.id): r.state for r in pc.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
        assert runs[ids[0]].name == "Completed" and runs[ids[1]].name == "Rejected" and runs[ids[1]].is_failed()
        keys = {a.key for a in pc.read_artifacts()}
        assert {f"audit-{fp[:12]}", f"audit-{fp[:12]}-report"} <= keys
        deadline = time.monotonic() + 60
        while True:
            events = pc.read_events(EventFilter(event=EventNameFilter(prefix=["mimic.audit."]),
                                                resource=EventResourceFilter(id=[f"mimic.teacher.{fp}"])), limit=50).events
            if len(events) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert sorted(e.event for e in events) == ["mimic.audit.rejected", "mimic.audit.sanitized"]

    # the registry's sanitized model, served over REST, answers with the student's embeddings
    port = free_port()
    serve = subprocess.Popen([str(venv_program("mlflow")), "models", "serve", "-m", f"models:/{name}@sanitized", "-h", "127.0.0.1",
                              "-p", str(port), "--env-manager", "local", "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT),  # mlflow runs the venv's uvicorn by name
                                  "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=serve)
        images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        got = np.asarray(json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"])
    finally:
        stop_process(serve)
    import torch

    from mimic.checkpoints import load_encoder
    from mimic.evaluate import extract_features

    want = extract_features(load_encoder(passed["student"]["file"]).encoder.eval(),
                            torch.as_tensor(images).permute(0, 3, 1, 2).contiguous()).numpy()
    assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)


def test_prefect_yaml_deploys_onto_a_process_work_pool(servers):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prefect = str(venv_program("prefect"))
    subprocess.run([prefect, "work-pool", "create", "mimic", "--type", "process"], check=True, env=env, capture_output=True,
                   timeout=120)
    r = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from prefect import get_client

    with get_client(sync_client=True) as pc:
        deps = {d.name: d for d in pc.read_deployments()}
    assert {"audit", "watch"} <= set(deps)
    assert deps["watch"].work_pool_name == "mimic" and deps["watch"].schedules[0].schedule.cron == "*/15 * * * *"
    assert "AuditInput" in json.dumps(deps["audit"].parameter_openapi_schema)
