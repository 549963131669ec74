"""The Prefect audit and watch flows against real local services (Prefect harness, MLflow sqlite
store, moto S3 server): caching through task states, S3 storage, the registry gate, watching."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mimic.config import load_config

HEAVY = ("mi", "distill", "evaluate-teacher", "evaluate-student")


def _audit(teacher: Path, *sets: str, **kw):
    from flows.audit import audit_flow

    cfg = load_config(profile="tiny", sets=list(sets))
    state = audit_flow(teacher=str(teacher), data="synthetic", params=cfg.to_dict(), progress=False, return_state=True, **kw)
    return state.result(), state


def _task_states(flow_state) -> dict[str, str]:
    """{task name: state name} of a flow run, read back from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {tr.name: tr.state.name for tr in runs}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_second_audit_reuses_every_heavy_task_and_a_distill_param_reruns_only_its_steps(pipeline_env, tiny_teachers):
    first, s1 = _audit(tiny_teachers["teacher"], track=False)
    states = _task_states(s1)
    assert all(states[t] == "Completed" for t in HEAVY), states
    assert not any(first["cached"].values())

    again, s2 = _audit(tiny_teachers["teacher"], track=False)
    states = _task_states(s2)
    assert all(states[t] == "Cached" for t in HEAVY), states
    assert all(again["cached"].values())
    assert again["student"]["fingerprint"] == first["student"]["fingerprint"]
    assert again["student_asr"] == first["student_asr"] and again["student_ca"] == first["student_ca"]

    changed, s3 = _audit(tiny_teachers["teacher"], "distill.epochs=3", track=False)
    states = _task_states(s3)
    assert states["mi"] == "Cached" and states["evaluate-teacher"] == "Cached", states
    assert states["distill"] == "Completed" and states["evaluate-student"] == "Completed", states
    assert changed["student"]["fingerprint"] != first["student"]["fingerprint"]

    # cached records whose files were deleted are recomputed, not returned dangling
    shutil.rmtree(pipeline_env / "runs" / "cache")
    redo, _ = _audit(tiny_teachers["teacher"], track=False)
    assert not redo["cached"]["distill"] and Path(redo["student"]["path"]).exists()
    assert redo["student"]["fingerprint"] == first["student"]["fingerprint"]  # deterministic on CPU


def test_audit_with_s3_store_and_registry_gate(pipeline_env, tiny_teachers, s3_env):
    import boto3
    from mlflow import MlflowClient

    store = f"s3://{s3_env}/mimic"
    res, _ = _audit(tiny_teachers["teacher"], store=store)
    fp = res["teacher"]["fingerprint"]
    s3 = boto3.client("s3")
    prefix = f"mimic/sanitized/{fp}/{res['audit_key']}/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env, Prefix=prefix)["Contents"])
    assert keys == [prefix + "meta.json", prefix + "student.safetensors"]
    body = s3.get_object(Bucket=s3_env, Key=prefix + "student.safetensors")["Body"].read()
    local_sha = _sha256(Path(res["student"]["file"]))
    assert hashlib.sha256(body).hexdigest() == local_sha == res["store"]["sha256"]
    meta = json.loads(s3.get_object(Bucket=s3_env, Key=prefix + "meta.json")["Body"].read())
    assert meta["sha256"] == local_sha and meta["teacher_fingerprint"] == fp

    client = MlflowClient()
    name = res["config"]["gate"]["model_name"]
    reg = res["mlflow"]["registry"]
    mv = client.get_model_version(name, reg["version"])
    assert {"teacher_fingerprint", "teacher_uri", "data_version", "verdict"} <= set(mv.tags)
    assert mv.tags["teacher_fingerprint"] == fp and mv.tags["data_version"] == res["data"]["data_version"]
    run = client.get_run(res["mlflow"]["run_id"])
    assert run.data.params["distill.epochs"] == str(res["config"]["distill"]["epochs"])
    assert run.data.metrics["student_asr"] == pytest.approx(res["student_asr"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mi.png", "losses.png", "results.json", "teacher_fingerprint.json"} <= artifacts
    assert res["verdict"]["passed"], res["verdict"]
    assert mv.tags["verdict"] == "sanitized"
    assert client.get_model_version_by_alias(name, "sanitized").version == mv.version

    # a stricter gate: a new version tagged rejected, the alias stays where it was
    assert res["student_asr"] > 0, "precondition: the tiny student keeps some ASR"
    strict, _ = _audit(tiny_teachers["teacher"], f"gate.max_asr={res['student_asr'] / 2}", store=store)
    assert all(strict["cached"].values())  # only the gate changed: nothing heavy re-ran
    rej = client.get_model_version(name, strict["mlflow"]["registry"]["version"])
    assert rej.version != mv.version and rej.tags["verdict"] == "rejected" and "ASR" in rej.tags["verdict_reason"]
    assert strict["store"]["student_uri"].startswith(f"s3://{s3_env}/mimic/quarantine/{fp}/{strict['audit_key']}/")
    assert client.get_model_version_by_alias(name, "sanitized").version == mv.version


def test_watch_audits_each_fingerprint_once(pipeline_env, tiny_teachers):
    from flows.watch import watch_flow

    incoming = pipeline_env / "incoming"
    incoming.mkdir()
    shutil.copy(tiny_teachers["teacher"], incoming / "teacher.pt")
    shutil.copy(tiny_teachers["clean"], incoming / "vendor-model.pt")
    shutil.copy(tiny_teachers["teacher"], incoming / "teacher-renamed.pt")  # same weights, another name
    (incoming / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # refused, never executed
    params = load_config(profile="tiny").to_dict()
    tick = watch_flow(location=str(incoming), data="synthetic", params=params, track=False)
    assert len(tick["audited"]) == 2, tick
    assert len(tick["skipped"]) == 1 and len(tick["refused"]) == 1, tick
    audited = {a["fingerprint"] for a in tick["audited"]}
    assert len(audited) == 2
    for a in tick["audited"]:
        assert Path(a["results"]).exists()
    second = watch_flow(location=str(incoming), data="synthetic", params=params, track=False)
    assert second["audited"] == [] and second["refused"] == [] and second["failed"] == [], second


def test_watch_command_once_then_on_a_schedule(pipeline_env, tiny_teachers, capsys):
    from mimic.cli import main

    incoming = pipeline_env / "incoming"
    incoming.mkdir()
    shutil.copy(tiny_teachers["teacher"], incoming / "model-a.pt")
    common = ["--data", "synthetic", "--profile", "tiny", "--no-track", "--quiet"]
    assert main(["watch", str(incoming), "--once", *common, "--json", "tick1.json"]) == 0
    assert len(json.loads(Path("tick1.json").read_text())["audited"]) == 1
    assert "1 audited" in capsys.readouterr().out
    # no Prefect server configured: --cron ticks here (first tick at once); nothing new to audit
    assert main(["watch", str(incoming), "--cron", "*/5 * * * *", "--max-ticks", "1", *common]) == 0
    assert "0 audited, 1 already seen" in capsys.readouterr().out
    assert main(["watch", str(incoming), "--cron", "every minute", *common]) == 2
    assert "not a cron expression" in capsys.readouterr().err
