"""Outages and concurrency, against real loopback services started here: an S3 endpoint that is
down or drops uploads (moto behind a fault-injecting proxy), an MLflow tracking server that is down
and then comes up (a real ``mlflow server`` process), and four audits of one teacher at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from services import OPEN_GATE

from mimic.errors import StoreUnavailable, TrackingUnavailable


def _audit(teacher: Path, out: str, **services):
    from flows.audit import audit_flow
    from flows.params import AuditInput, Services, Settings

    return audit_flow(AuditInput(teacher=str(teacher), data="synthetic"), Settings(profile="tiny", overrides=list(OPEN_GATE)),
                      Services(network_retries=0, **services), out=out, progress=False)


def _objects(bucket: str, endpoint: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return [o["Key"] for o in listing.get("Contents", [])]


def test_s3_down_then_dropping_uploads_then_back(pipeline_env, tiny_teachers, s3_env, s3_endpoint, fault_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    store = f"s3://{s3_env}/out"
    out = pipeline_env / "audit"

    fault_proxy.refuse(True)
    with pytest.raises(StoreUnavailable, match="attempts"):
        _audit(tiny_teachers["teacher"], str(out), store=store, track=False)
    results = json.loads((out / "results.json").read_text())  # local results are kept
    assert results["student_ca"] is not None and (out / "student.safetensors").exists()
    assert _objects(s3_env, s3_endpoint) == []

    fault_proxy.heal()
    fault_proxy.drop_uploads(after=1024)  # every upload body is cut off mid-way
    with pytest.raises(StoreUnavailable):
        _audit(tiny_teachers["teacher"], str(out), store=store, track=False)
    assert _objects(s3_env, s3_endpoint) == []  # no partial object under the final key
    uploads = boto3.client("s3", endpoint_url=s3_endpoint).list_multipart_uploads(Bucket=s3_env)
    assert not uploads.get("Uploads")

    fault_proxy.heal()
    res = _audit(tiny_teachers["teacher"], str(out), store=store, track=False)
    assert res["cached"]["distill"] and res["cached"]["mi"]  # the distillation was not repeated
    keys = _objects(s3_env, s3_endpoint)
    assert len(keys) == 2 and any(k.endswith("student.safetensors") for k in keys)


def test_mlflow_down_then_back(pipeline_env, tiny_teachers, monkeypatch):
    """With MLflow's default client settings, a down tracking server is reported by the probe before any
    heavy work; once it is up the audit logs, and a repeated audit reuses the registry version."""
    from services import free_port, stop_process, venv_program, wait_http

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    out = pipeline_env / "audit"
    with pytest.raises(TrackingUnavailable, match="MLflow"):
        _audit(tiny_teachers["teacher"], str(out))
    assert not (out / "results.json").exists()  # reported before the stages ran

    server = subprocess.Popen(
        [str(venv_program("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{pipeline_env / 'server.db'}",
         "--artifacts-destination", str(pipeline_env / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=pipeline_env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=server)
        res = _audit(tiny_teachers["teacher"], str(out))
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(res["mlflow"]["run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["teacher_fingerprint"] == res["teacher"]["fingerprint"]
        assert res["verdict"]["passed"], res["verdict"]
        mv = client.get_model_version(res["mlflow"]["registry"]["name"], res["mlflow"]["registry"]["version"])
        assert mv.tags["verdict"] == "sanitized"
        # a repeated audit is a new run (cached stages) but never a duplicate registry version
        again = _audit(tiny_teachers["teacher"], str(out))
        assert again["cached"]["distill"] and again["mlflow"]["run_id"] != res["mlflow"]["run_id"]
        assert again["mlflow"]["registry"]["version"] == res["mlflow"]["registry"]["version"]
        assert again["mlflow"]["registry"]["reused"]
    finally:
        stop_process(server)


def test_a_hung_mlflow_server_is_reported_within_a_minute_by_default(pipeline_env, tiny_teachers, monkeypatch, capsys):
    """Issue 15: with the default settings (no --retries, no MLflow variables), a tracking server that
    accepts connections but never answers ends `mimic audit` with exit 1 and one line naming MLflow,
    in under 60 s and before any heavy work; the command bounds MLflow's own client for later calls."""
    import socket
    import time

    from flows.cli import MLFLOW_CLIENT_BOUNDS
    from mimic.cli import main

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    for name in MLFLOW_CLIENT_BOUNDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
    try:
        t0 = time.monotonic()
        rc = main(["audit", "--teacher", str(tiny_teachers["teacher"]), "--data", "synthetic", "--profile", "tiny",
                   "--out", str(pipeline_env / "audit"), "--quiet"])
        elapsed = time.monotonic() - t0
    finally:
        hung.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and elapsed < 60, (rc, elapsed, err)
    assert err and err[-1].startswith("mimic: error:") and "MLflow" in err[-1], err  # Prefect's own log lines precede it
    assert not any("Traceback" in line for line in err), err
    assert not (pipeline_env / "audit" / "results.json").exists()  # reported before the stages ran
    import os

    assert {k: os.environ[k] for k in MLFLOW_CLIENT_BOUNDS} == MLFLOW_CLIENT_BOUNDS
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # the user's own value wins
    from flows.cli import _orchestrated

    with _orchestrated(type("Args", (), {"quiet": False})()):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


CONCURRENT = """
import json, sys
from mimic.cache import StageCache
from mimic.config import load_config
from mimic.inputs import admit_teacher, clean_subset, clean_version, load_data
from mimic.stages.distill import plan_distill
from mimic.stages.mi import plan_mi, weights_of
cfg = load_config(profile="tiny", sets=["distill.epochs=3"])
t, cache = admit_teacher(sys.argv[1]), StageCache(sys.argv[2])
clean = clean_subset(cfg, load_data(cfg))
v = clean_version(clean)
mi = plan_mi(cfg, t.loaded, t.fingerprint, clean, v).run(cache)
res = plan_distill(cfg, t.loaded, t.fingerprint, clean, v, weights_of(mi), progress=False).run(cache)
print(json.dumps({"reused": res.cached, "fingerprint": res.manifest["fingerprint"], "student": str(res.path("student")),
                  "dir": str(res.dir)}))
"""


def test_four_concurrent_audits_of_one_teacher_distil_once(tiny_teachers, tmp_path):
    root = tmp_path / "cache"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tiny_teachers["teacher"]), str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(not r["reused"] for r in results) == 1, results  # one distilled, three waited and reused
    assert len({r["fingerprint"] for r in results}) == 1 and len({r["student"] for r in results}) == 1
    # a different teacher in parallel gets its own directory: no shared mutable state
    other = subprocess.run([sys.executable, "-c", CONCURRENT, str(tiny_teachers["clean"]), str(root)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout.strip().splitlines()[-1])["dir"] != results[0]["dir"]
