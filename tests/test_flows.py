"""The Prefect audit and watch flows against real local services (Prefect harness, MLflow sqlite
store, moto S3 server): caching through task states, S3 storage, the registry gate, watching."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from services import OPEN_GATE, open_gate_args


HEAVY = ("scan-teacher", "mi", "distill", "scan-student", "evaluate-teacher", "evaluate-student")


def _audit(teacher: Path, *sets: str, services=None, data: str = "synthetic", **kw):
    from flows.audit import audit_flow, results_of
    from flows.params import AuditInput, Services, Settings

    state = audit_flow(AuditInput(teacher=str(teacher), data=data), Settings(profile="tiny", overrides=list(sets)),
                       services or Services(), progress=False, return_state=True, **kw)
    return results_of(state), state


def _services(**kw):
    from flows.params import Services

    return Services(**kw)


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
    first, s1 = _audit(tiny_teachers["teacher"], services=_services(track=False))
    states = _task_states(s1)
    assert all(states[t] == "Completed" for t in HEAVY), states
    assert not any(first["cached"].values())

    again, s2 = _audit(tiny_teachers["teacher"], services=_services(track=False))
    states = _task_states(s2)
    assert all(states[t] == "Cached" for t in HEAVY), states
    assert all(again["cached"].values())
    assert again["student"]["fingerprint"] == first["student"]["fingerprint"]
    assert again["student_asr"] == first["student_asr"] and again["student_ca"] == first["student_ca"]

    changed, s3 = _audit(tiny_teachers["teacher"], "distill.epochs=3", services=_services(track=False))
    states = _task_states(s3)
    assert states["mi"] == "Cached" and states["evaluate-teacher"] == "Cached", states
    assert states["distill"] == "Completed" and states["evaluate-student"] == "Completed", states
    assert changed["student"]["fingerprint"] != first["student"]["fingerprint"]

    # cached records whose files were deleted are recomputed, not returned dangling
    shutil.rmtree(pipeline_env / "runs" / "cache")
    redo, _ = _audit(tiny_teachers["teacher"], services=_services(track=False))
    assert not redo["cached"]["distill"] and Path(redo["student"]["path"]).exists()
    assert redo["student"]["fingerprint"] == first["student"]["fingerprint"]  # deterministic on CPU


def _events(prefix: str, fingerprint: str) -> list:
    """Events named ``prefix*`` about the teacher ``fingerprint``, read back from the Prefect API."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(EventFilter(event=EventNameFilter(prefix=[prefix]),
                                              resource=EventResourceFilter(id=[f"mimic.teacher.{fingerprint}"])), limit=50)
    return page.events


def _wait_events(prefix: str, fingerprint: str, n: int, where=lambda e: True) -> list:
    """The events about ``fingerprint`` under ``prefix`` that satisfy ``where``, once ``n`` have arrived
    (other tests share the Prefect server: a watch tick's refusals are about "unknown" too)."""
    import time

    deadline = time.monotonic() + 60
    while True:  # events reach the API asynchronously (Prefect's events worker)
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
        events = [e for e in _events(prefix, fingerprint) if where(e)]
        if len(events) >= n or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def test_audit_services_pass_then_reject_then_fail(pipeline_env, tiny_teachers, s3_env):
    """What each service holds after a passing, a rejected and a failed audit of one teacher."""
    import boto3
    from mlflow import MlflowClient
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from datetime import datetime, timezone

    started = datetime.now(timezone.utc)  # the events of this test's audits (other tests audit the same teacher)
    s3 = boto3.client("s3")
    s3.put_bucket_versioning(Bucket=s3_env, VersioningConfiguration={"Status": "Enabled"})
    store = f"s3://{s3_env}/mimic"
    svc = _services(store=store, sse="AES256", dvc_remote=f"s3://{s3_env}/dvc")
    res, state = _audit(tiny_teachers["teacher"], *OPEN_GATE, services=svc)
    assert state.type.value == "COMPLETED" and res["verdict"]["passed"], res["verdict"]
    fp, akey = res["teacher"]["fingerprint"], res["audit_key"]

    # S3: sanitized/ prefix, SHA-256 checksums, SSE, VersionIds recorded
    prefix = f"mimic/sanitized/{fp}/{akey}/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_env, Prefix=prefix)["Contents"])
    assert keys == [prefix + "meta.json", prefix + "student.safetensors"]
    head = s3.head_object(Bucket=s3_env, Key=prefix + "student.safetensors", ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == "AES256" and head["VersionId"] == res["store"]["version_id"]
    body = s3.get_object(Bucket=s3_env, Key=prefix + "student.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == _sha256(Path(res["student"]["file"])) == res["store"]["sha256"]
    meta = json.loads(s3.get_object(Bucket=s3_env, Key=prefix + "meta.json")["Body"].read())
    assert meta["sha256"] == res["store"]["sha256"] and meta["student_version_id"] == res["store"]["version_id"]

    # DVC: the teacher file was added to the registry and pushed to the remote (its md5 under the remote prefix)
    dvc = res["data"]["dvc"]["teacher"]
    assert dvc["pushed"] and dvc["md5"] == _md5(tiny_teachers["teacher"])
    remote_keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_env, Prefix="dvc/")["Contents"]]
    assert any(k.endswith(dvc["md5"][2:]) for k in remote_keys), remote_keys

    # MLflow: a FINISHED run with live per-epoch losses, inputs, the student as a model with a signature
    client = MlflowClient()
    run = client.get_run(res["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["verdict"] == "sanitized"
    assert run.data.params["distill.epochs"] == str(res["config"]["distill"]["epochs"])
    history = client.get_metric_history(run.info.run_id, "distill.loss")
    assert [m.step for m in history] == list(range(1, res["config"]["distill"]["epochs"] + 1))
    assert all(m.timestamp > 0 for m in history) and history[-1].timestamp >= history[0].timestamp
    assert run.data.metrics["student_ca"] == pytest.approx(res["student_ca"])
    contexts = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                for d in run.inputs.dataset_inputs}
    assert contexts["clean"][1] == "training" and contexts["eval"][1] == "evaluation"
    data_md5 = (res["data"]["dvc"].get("data") or {}).get("md5")  # the DVC md5 when the data is a DVC-added file
    assert contexts["clean"][0] == (data_md5 or res["data"]["clean_version"])[:36], (contexts, res["data"])
    teacher_model = client.get_logged_model(run.data.tags["mimic.teacher_model_id"])
    assert teacher_model.tags["mimic.fingerprint"] == fp and teacher_model.tags["mimic.dvc_md5"] == dvc["md5"]
    assert [m.model_id for m in run.inputs.model_inputs] == [teacher_model.model_id]
    student_model = client.get_logged_model(res["mlflow"]["model_id"])
    assert student_model.tags["mimic.teacher_model_id"] == teacher_model.model_id
    assert {m.key for m in student_model.metrics} >= {"student_ca", "teacher_ca"}
    from mlflow.models import get_model_info

    info = get_model_info(res["mlflow"]["model_uri"])
    assert info.signature is not None and tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 32, 32, 3)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"mi.png", "losses.png", "results.json", "report.html"} <= artifacts
    name = res["mlflow"]["registry"]["name"]
    assert name == "teacher-sanitized"  # the teacher file's name: one registered model per teacher lineage
    mv = client.get_model_version_by_alias(name, "sanitized")
    assert str(mv.version) == res["mlflow"]["registry"]["version"] and mv.tags["verdict"] == "sanitized"
    assert mv.tags["teacher_fingerprint"] == fp and mv.tags["data_version"] == res["data"]["data_version"]
    # the scan evidence: registry tags, PL1 metrics, the inverted triggers as artifacts
    assert mv.tags["scan_verdict"] == res["scan"]["student"]["verdict"]
    assert float(mv.tags["teacher_pl1"]) == pytest.approx(res["teacher_pl1"], abs=1e-4)
    assert run.data.metrics["scan.teacher.pl1"] == pytest.approx(res["scan"]["teacher"]["pl1"])
    assert {"trigger.png", "student-trigger.png"} <= artifacts

    # a stricter gate: Rejected state, quarantine/, a run with the student logged but no new version
    worst = res["worst_case"]["student_asr"]
    assert worst > 0, "precondition: the tiny student keeps some ASR on some probe"
    strict, sstate = _audit(tiny_teachers["teacher"], *OPEN_GATE, f"gate.max_asr={worst / 2}", services=svc)
    assert sstate.type.value == "FAILED" and sstate.name == "Rejected" and "ASR" in sstate.message
    assert all(strict["cached"][k] for k in HEAVY)  # only the gate changed: nothing heavy re-ran
    assert strict["store"]["student_uri"].startswith(f"s3://{s3_env}/mimic/quarantine/{fp}/{strict['audit_key']}/")
    srun = client.get_run(strict["mlflow"]["run_id"])
    assert srun.info.status == "FINISHED" and srun.data.tags["verdict"] == "rejected"
    assert client.get_logged_model(strict["mlflow"]["model_id"]).tags["verdict"] == "rejected"
    assert not strict["mlflow"]["registry"]["registered"]
    assert [v.version for v in client.search_model_versions(f"name = '{name}'")] == [mv.version]
    assert client.get_model_version_by_alias(name, "sanitized").version == mv.version

    # a failure after the run opened (the store's bucket does not exist): run FAILED with the error, flow Failed
    bad = _services(store="s3://no-such-bucket-mimic/x")
    from mimic.errors import StoreError

    with pytest.raises(StoreError):
        _audit(tiny_teachers["teacher"], services=bad)
    failed = client.search_runs([run.info.experiment_id], "attributes.status = 'FAILED'")
    assert len(failed) == 1 and "no-such-bucket-mimic" in failed[0].data.tags["mimic.error"]

    # Prefect: artifacts (CA/ASR table, markdown report with the MI plot) and one event per outcome
    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"audit-{fp[:12]}",
                                                                                              f"audit-{fp[:12]}-report"])))
    kinds = {a.key: a.type for a in arts}
    assert kinds == {f"audit-{fp[:12]}": "table", f"audit-{fp[:12]}-report": "markdown"}
    assert any("data:image/png;base64," in str(a.data) for a in arts if a.type == "markdown")
    events = _wait_events("mimic.audit.", fp, 3, lambda e: e.occurred >= started)
    assert sorted(e.event for e in events) == ["mimic.audit.failed", "mimic.audit.rejected", "mimic.audit.sanitized"]
    passed_event = next(e for e in events if e.event == "mimic.audit.sanitized")
    assert passed_event.payload["student_uri"] == res["store"]["student_uri"]


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_watch_audits_each_fingerprint_once(pipeline_env, tiny_teachers):
    from flows.watch import watch_flow

    incoming = pipeline_env / "incoming"
    incoming.mkdir()
    shutil.copy(tiny_teachers["teacher"], incoming / "teacher.pt")
    shutil.copy(tiny_teachers["clean"], incoming / "vendor-model.pt")
    shutil.copy(tiny_teachers["teacher"], incoming / "teacher-renamed.pt")  # same weights, another name
    (incoming / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # refused, never executed
    from flows.params import Settings

    params = Settings(profile="tiny")
    tick = watch_flow(location=str(incoming), data="synthetic", settings=params, services=_services(track=False))
    assert len(tick["audited"]) == 2, tick
    assert len(tick["skipped"]) == 1 and len(tick["refused"]) == 1, tick
    audited = {a["fingerprint"] for a in tick["audited"]}
    assert len(audited) == 2
    for a in tick["audited"]:
        assert Path(a["results"]).exists()
    second = watch_flow(location=str(incoming), data="synthetic", settings=params, services=_services(track=False))
    assert second["audited"] == [] and second["refused"] == [] and second["failed"] == [], second


def test_watch_command_once_then_on_a_schedule(pipeline_env, tiny_teachers, capsys):
    """Also: its outputs inside the watched folder are never taken for teachers (a planted copy of a
    good teacher in each is not audited, nor is the student the first tick stores there); a symlink
    out of the folder, a text file and a name with a newline are each refused once, with a reason
    that never quotes their content, and the newline cannot forge an output line."""
    from mimic.cli import main

    incoming, outside = pipeline_env / "incoming", pipeline_env / "outside"
    incoming.mkdir()
    outside.mkdir()
    shutil.copy(tiny_teachers["teacher"], incoming / "model-a.pt")
    for nested in ("store", "out", "cache", "ledger"):  # a good teacher planted in each of mimic's own outputs
        (incoming / nested / "old").mkdir(parents=True)
        shutil.copy(tiny_teachers["clean"], incoming / nested / "old" / "planted.pt")
    (outside / "secret.pt").write_text("TOPSECRET-outside\n")
    (incoming / "link.pt").symlink_to(outside / "secret.pt")
    (incoming / "notes.pt").write_text("TOPSECRET-inside\n")
    shutil.copy(tiny_teachers["clean"], incoming / "evil\nfailed: forged.pt")
    common = ["--data", "synthetic", "--profile", "tiny", "--no-track", "--quiet", *open_gate_args(), "--store", str(incoming / "store"),
              "--out-root", str(incoming / "out"), "--cache", str(incoming / "cache"), "--ledger", str(incoming / "ledger")]
    rc = main(["watch", str(incoming), "--once", *common, "--json", "tick1.json"])
    tick = json.loads(Path("tick1.json").read_text())
    assert [a["uri"] for a in tick["audited"]] == [str(incoming / "model-a.pt")] and tick["skipped"] == []
    assert rc == 0 and tick["audited"][0]["verdict"] == "sanitized"  # the gate is opened: the watch is under test here
    assert {Path(r["uri"]).name for r in tick["refused"]} == {"link.pt", "notes.pt", "evil\nfailed: forged.pt"}
    cap = capsys.readouterr()
    assert "1 audited, 0 already seen, 3 refused" in cap.out
    assert not any(line.startswith("failed: forged") for line in cap.out.splitlines()), cap.out
    assert "evil\\nfailed: forged.pt" in cap.out  # printed escaped, on its own line
    ledger_text = "".join(p.read_text() for p in (incoming / "ledger").rglob("*.json"))
    for text in (cap.out, cap.err, ledger_text, Path("tick1.json").read_text()):
        assert "TOPSECRET" not in text
    assert list((incoming / "store").rglob("*.safetensors")) or list((incoming / "out").rglob("*.safetensors"))
    # no Prefect server configured: --cron ticks here (first tick at once); nothing new to audit: not the
    # student just stored inside the watched folder, and the refused files are not reported again
    assert main(["watch", str(incoming), "--cron", "*/5 * * * *", "--max-ticks", "1", *common]) == 0
    assert "0 audited, 1 already seen, 0 refused, 0 failed" in capsys.readouterr().out
    assert main(["watch", str(incoming), "--cron", "every minute", *common]) == 2
    assert "not a cron expression" in capsys.readouterr().err
    assert main(["watch", str(incoming / "store"), "--once", *common]) == 2  # would audit its own students
    assert "inside the store" in capsys.readouterr().err


def test_refused_teacher_ends_failed_with_the_reason_and_an_event(pipeline_env):
    from mimic.errors import CheckpointError

    evil = pipeline_env / "evil.pt"
    evil.write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would run os.system: refused, never executed
    with pytest.raises(CheckpointError) as refused:
        _audit(evil)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    failed = [r for r in runs if r.state.is_failed() and str(refused.value).split(":")[0] in (r.state.message or "")]
    assert failed, [(r.name, r.state.message) for r in runs]
    events = _wait_events("mimic.audit.refused", "unknown", 1, lambda e: e.resource["prefect.resource.name"] == str(evil))
    assert any(e.resource["prefect.resource.name"] == str(evil) and str(refused.value) in e.payload["reason"] for e in events)


def test_watch_once_over_every_hostile_file_audits_the_good_teachers_and_reports_each_hostile_one_once(
        pipeline_env, tiny_teachers, capsys):  # fmt: skip
    """Issue 12's acceptance: one folder holding every hostile file of tests/hostile.py (size bombs,
    wrongly typed extras, deep JSON, memo bomb, ambiguous archives, bad normalisation, ...), a code
    payload, a symlink out, a text file and a newline name, plus two good teachers. ``mimic watch
    --once`` audits the two good ones, refuses each hostile one once with its own reason, never
    crashes; the next tick reports none of them again."""
    from hostile import CASES

    from mimic.cli import main

    incoming, outside = pipeline_env / "incoming", pipeline_env / "outside"
    incoming.mkdir()
    outside.mkdir()
    shutil.copy(tiny_teachers["teacher"], incoming / "good-teacher.pt")
    shutil.copy(tiny_teachers["clean"], incoming / "good-clean.pt")
    expected: dict[str, str] = {}
    for case in CASES:
        built = case.build(outside)
        name = f"{case.name}{built.suffix}"
        built.rename(incoming / name)
        expected[name] = case.expect
    (incoming / "payload.pt").write_bytes(b"\x80\x04cos\nsystem\n.")
    expected["payload.pt"] = "os.system"
    (outside / "secret.pt").write_text("TOPSECRET\n")
    (incoming / "link.pt").symlink_to(outside / "secret.pt")
    expected["link.pt"] = "symlink"
    (incoming / "notes.pt").write_text("TOPSECRET\n")
    expected["notes.pt"] = "text file"
    (incoming / "odd\nname.pt").write_bytes(b"x")
    expected["odd\nname.pt"] = ""
    common = ["--data", "synthetic", "--profile", "tiny", "--no-track", "--quiet", *open_gate_args(),
              "--store", str(pipeline_env / "store"), "--out-root", str(pipeline_env / "out"),
              "--cache", str(pipeline_env / "cache"), "--ledger", str(pipeline_env / "ledger")]
    rc = main(["watch", str(incoming), "--once", *common, "--json", "tick1.json"])
    tick = json.loads(Path("tick1.json").read_text())
    assert sorted(Path(a["uri"]).name for a in tick["audited"]) == ["good-clean.pt", "good-teacher.pt"], tick["audited"]
    assert all(a["verdict"] == "sanitized" for a in tick["audited"]) and rc == 0, (rc, tick["audited"])
    assert tick["failed"] == [], tick["failed"]
    refused = [Path(r["uri"]).name for r in tick["refused"]]
    assert sorted(refused) == sorted(expected), sorted(set(expected) ^ set(refused))  # each once, none missing
    for r in tick["refused"]:
        assert expected[Path(r["uri"]).name] in r["reason"], r
        assert "\n" not in r["reason"] and "TOPSECRET" not in r["reason"], r
    out = capsys.readouterr().out
    assert f"2 audited, 0 already seen, {len(expected)} refused, 0 failed" in out, out
    assert main(["watch", str(incoming), "--once", *common, "--json", "tick2.json"]) == 0
    again = json.loads(Path("tick2.json").read_text())
    assert again["audited"] == [] and again["refused"] == [] and again["failed"] == [], again
    assert "0 audited, 2 already seen, 0 refused, 0 failed" in capsys.readouterr().out
