"""One audit, one schema, one identity across the fronts: demo, `mimic audit` (Prefect flow), the
flow called from Python, and the stage commands `dvc repro` runs (mi, distill, evaluate, results)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from services import OPEN_GATE, open_gate_args
import pytest

from mimic.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "results.schema.json").read_text())
LENIENT = open_gate_args()


def valid(res: dict) -> dict:
    jsonschema.validate(res, SCHEMA)
    return res


def test_all_fronts_write_results_that_validate_against_one_schema(pipeline_env, tiny_teachers, capsys):
    tmp = pipeline_env
    teacher = str(tiny_teachers["teacher"])
    # 1. mimic demo
    assert main(["demo", "--profile", "tiny", "--out", str(tmp / "demo"), "--json", str(tmp / "demo.json"), "-q", *LENIENT]) == 0
    demo = valid(json.loads((tmp / "demo.json").read_text()))
    assert demo["kind"] == "demo" and demo == valid(json.loads((tmp / "demo" / "results.json").read_text()))
    assert {"pretrain", "attack", "mi", "distill", "evaluate-clean"} <= set(demo["stages"])
    # the schema is not a rubber stamp
    for broken in ({k: v for k, v in demo.items() if k != "verdict"}, {**demo, "student_ca": 150.0},
                   {**demo, "schema": "mimic.results/0"}, {**demo, "teacher": {"fingerprint": "x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCHEMA)
    # 2. mimic audit (the Prefect flow behind the CLI)
    rc = main(["audit", "--teacher", teacher, "--data", "synthetic", "--profile", "tiny", "--out", str(tmp / "audit"),
               "--no-track", "--json", str(tmp / "audit.json"), "-q", *LENIENT])
    audit = valid(json.loads((tmp / "audit.json").read_text()))
    assert rc == 0 and audit["kind"] == "audit" and audit["store"]["student_uri"]
    assert (tmp / "audit" / "report.html").exists()
    # a rejected verdict (same stages, a strict gate): exit code 3, `--json -` alone on stdout, JSON log lines
    capsys.readouterr()
    rc = main(["audit", "--teacher", teacher, "--data", "synthetic", "--profile", "tiny", "--out", str(tmp / "strict"),
               "--no-track", "--json", "-", "--log-format", "json", "--set", "gate.max_ca_drop=0", "--set", "gate.max_asr=0"])
    cap = capsys.readouterr()
    strict = valid(json.loads(cap.out))
    assert rc == 3 and strict["verdict"]["verdict"] == "rejected", strict["verdict"]
    assert "/quarantine/" in strict["store"]["student_uri"] and "verdict: rejected" in cap.err
    logs = [json.loads(line) for line in cap.err.splitlines() if line.startswith("{")]
    assert logs and all({"time", "level", "logger", "message"} <= set(r) for r in logs)
    # 3. the flow called from Python: same stage keys, everything reused
    from flows.audit import audit_flow
    from flows.params import AuditInput, Services, Settings

    flow = valid(audit_flow(AuditInput(teacher=teacher, data="synthetic"),
                            Settings(profile="tiny", overrides=list(OPEN_GATE)),
                            Services(track=False), out=str(tmp / "flow"), progress=False))
    assert flow["stages"] == {k: {**v, "cached": True, "seconds": 0.0} for k, v in audit["stages"].items()}
    assert flow["audit_key"] == audit["audit_key"] and flow["student"]["fingerprint"] == audit["student"]["fingerprint"]
    # 4. the stage commands of the DVC pipeline, each in its own output dir, then `mimic results`
    common = ["--profile", "tiny", "--data", "synthetic", "--cache", str(tmp / "dvc-cache"), "-q"]
    assert main(["mi", "--teacher", teacher, "--out", str(tmp / "r" / "mi"), *common]) == 0
    assert main(["distill", "--teacher", teacher, "--mi", str(tmp / "r" / "mi" / "mi.json"), "--out", str(tmp / "r" / "st"),
                 *common]) == 0
    assert main(["evaluate", "--encoder", f"teacher={teacher}", "--encoder", f"student={tmp / 'r' / 'st' / 'student.pt'}",
                 "--trigger", teacher, "--out", str(tmp / "r" / "eval"), "--metrics", str(tmp / "r" / "eval.json"),
                 "--json", str(tmp / "r" / "eval-record.json"), *common]) == 0
    metrics, record = (json.loads((tmp / "r" / f).read_text()) for f in ("eval.json", "eval-record.json"))
    assert set(metrics) == {"encoders", "target_class"} and set(metrics["encoders"]) == {"teacher", "student"}
    assert record["encoders"] == metrics["encoders"] and {"seconds", "environment"} <= set(record)  # timing: not a metric
    for who, enc in (("teacher", teacher), ("student", str(tmp / "r" / "st" / "student.pt"))):
        assert main(["scan", enc, "--out", str(tmp / "r" / f"scan-{who}"), "--exit-zero", *common]) == 0
    rc = main(["results", "--teacher", teacher, "--stages", *(str(tmp / "r" / d) for d in ("scan-teacher", "mi", "st", "scan-student",
                                                                                           "eval/teacher", "eval/student")),
               "--out", str(tmp / "r" / "audit"), "--metrics", str(tmp / "r" / "metrics.json"), *common, *LENIENT])
    dvc = valid(json.loads((tmp / "r" / "audit" / "results.json").read_text()))
    assert rc == 0 and all(dvc["cached"].values())
    # same stage keys as the flow: the DVC stages computed exactly what the audit computes
    assert {k: v["key"] for k, v in dvc["stages"].items()} == {k: v["key"] for k, v in audit["stages"].items()}
    assert dvc["student"]["fingerprint"] == audit["student"]["fingerprint"]
    assert set(json.loads((tmp / "r" / "metrics.json").read_text())) == {
        "verdict", "teacher_ca", "teacher_asr", "student_ca", "student_asr", "probes"}  # CA/ASR only: PL1 is in results.json


def test_results_refuses_stale_stage_outputs(pipeline_env, tiny_teachers):
    """`mimic results` computes nothing: a stage output made with other params is a one-line error."""
    tmp, teacher = pipeline_env, str(tiny_teachers["teacher"])
    common = ["--profile", "tiny", "--data", "synthetic", "--cache", str(tmp / "c"), "-q"]
    assert main(["mi", "--teacher", teacher, "--out", str(tmp / "mi"), *common]) == 0
    assert main(["distill", "--teacher", teacher, "--mi", str(tmp / "mi" / "mi.json"), "--out", str(tmp / "st"), *common]) == 0
    rc = main(["results", "--teacher", teacher, "--stages", str(tmp / "mi"), str(tmp / "st"), "--out", str(tmp / "a"),
               "--set", "distill.lr=0.5", *common])
    assert rc == 2 and not (tmp / "a" / "results.json").exists()


def test_longer_distillation_through_the_flow_resumes_the_shorter_one(pipeline_env, tiny_teachers):
    """Rule 2: extending distill.epochs from N to 2N through the audit resumes from epoch N, and the
    result is the student a straight 2N-epoch run makes (bit for bit on CPU)."""
    from flows.audit import audit_flow
    from flows.params import AuditInput, Services, Settings

    teacher = str(tiny_teachers["teacher"])

    def audit(epochs: int, root: str) -> dict:
        return audit_flow(AuditInput(teacher=teacher, data="synthetic"), Settings(profile="tiny", overrides=[f"distill.epochs={epochs}", *LENIENT[1::2]]),
                          Services(track=False, cache=root), out=f"{root}-out-{epochs}", progress=False)

    short = audit(2, "a")
    longer = audit(4, "a")
    assert short["student"]["resumed_from_epoch"] == 0 and longer["student"]["resumed_from_epoch"] == 2
    assert longer["stages"]["mi"]["cached"] and not longer["stages"]["distill"]["cached"]
    straight = audit(4, "b")
    assert straight["student"]["resumed_from_epoch"] == 0
    assert straight["student"]["fingerprint"] == longer["student"]["fingerprint"]
    # asking for the shorter run again reuses its finished stage; a shorter run than the lineage's checkpoint
    # never truncates it
    again = audit(2, "a")
    assert again["stages"]["distill"]["cached"] and again["student"]["fingerprint"] == short["student"]["fingerprint"]
    fresh3 = audit(3, "c")
    after4 = audit(3, "b")  # lineage "b" is at epoch 4: epoch 3 trains in its own directory
    assert after4["student"]["fingerprint"] == fresh3["student"]["fingerprint"]
