"""The `mimic` command: an end-to-end audit of a research-layout checkpoint, the demo, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import write_npz
from mimic.checkpoints import load_encoder
from mimic.cli import main
from mimic.encoders import ProjectionHead
from mimic.fingerprint import fingerprint_encoder

RESEARCH = {"conv1": "f.f.0", "bn1": "f.f.1", "layer1": "f.f.3", "layer2": "f.f.4", "layer3": "f.f.5", "layer4": "f.f.6"}
REQUIRED = {"teacher_ca", "teacher_asr", "student_ca", "student_asr", "mi", "weights", "seconds"}


def research_checkpoint(encoder, path: Path) -> Path:
    sd = {}
    for k, v in encoder.backbone.state_dict().items():
        head, rest = k.split(".", 1)
        sd[f"{RESEARCH[head]}.{rest}"] = v
    for k, v in ProjectionHead(encoder.feature_dim).state_dict().items():
        sd[f"g.{k}"] = v
    torch.save({"epoch": 200, "state_dict": sd}, path)
    return path


def test_audit_of_research_layout_checkpoint_end_to_end(tiny_encoder, pipeline_env, capsys):
    tmp_path = pipeline_env
    teacher = research_checkpoint(tiny_encoder, tmp_path / "model_200.pth")
    data = write_npz(tmp_path / "d.npz", n_train=120, n_test=60)
    out = tmp_path / "audit"
    rc = main(["audit", "--teacher", str(teacher), "--data", str(data), "--profile", "tiny", "--target-class", "1",
               "--trigger", str(_trigger(tmp_path)), "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    res = json.loads((tmp_path / "r.json").read_text())
    assert rc == (0 if res["verdict"]["passed"] else 3)  # a rejected verdict exits 3
    assert REQUIRED <= set(res)
    assert res["teacher"]["layout"] == "research" and res["teacher"]["fingerprint"] == fingerprint_encoder(tiny_encoder)
    assert set(res["mi"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert all(0 <= res[k] <= 100 for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr"))
    student = load_encoder(out / "student.safetensors")
    assert student.spec == load_encoder(teacher).spec
    assert student.meta["teacher_fingerprint"] == res["teacher"]["fingerprint"]
    for name in ("mi.json", "mi.png", "losses.json", "losses.png", "results.json"):
        assert (out / name).stat().st_size > 0
    stored = Path(res["store"]["student_uri"])
    assert stored.is_file() and stored.is_relative_to(tmp_path / "runs" / "store")
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "MLflow run" in printed
    _check_logged_student(res["mlflow"]["run_id"], student)
    # a second run reuses every heavy step
    rc = main(["audit", "--teacher", str(teacher), "--data", str(data), "--profile", "tiny", "--target-class", "1",
               "--trigger", str(_trigger(tmp_path)), "--out", str(out), "--json", str(tmp_path / "r2.json"), "--quiet"])
    again = json.loads((tmp_path / "r2.json").read_text())
    assert rc == (0 if again["verdict"]["passed"] else 3) and all(again["cached"].values()), again["cached"]
    assert again["student"]["fingerprint"] == res["student"]["fingerprint"]
    # every audit is its own MLflow run (the record that it happened), tagged with the same audit key
    import mlflow

    runs = [mlflow.MlflowClient().get_run(r["mlflow"]["run_id"]) for r in (res, again)]
    assert runs[0].info.run_id != runs[1].info.run_id and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mimic.audit_key"] for r in runs} == {res["audit_key"]} and again["audit_key"] == res["audit_key"]


def _check_logged_student(run_id: str, student) -> None:
    """The student logged to MLflow loads as a pyfunc and returns the student's own features; its
    predict declares an array input (MLflow then infers no schema and does not warn about hints)."""
    import typing

    import mlflow
    import numpy as np
    from mlflow.types.type_hints import _signature_cannot_be_inferred_from_type_hint

    from mimic.evaluate import extract_features

    uri = mlflow.MlflowClient().get_run(run_id).data.tags["mimic.model_uri"]
    model = mlflow.pyfunc.load_model(uri)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = model.predict(images.numpy())  # NHWC uint8, as a user would pass decoded images
    want = extract_features(student.encoder.eval(), images.permute(0, 3, 1, 2).contiguous()).numpy()
    assert got.shape == want.shape == (4, student.encoder.feature_dim)
    assert np.allclose(got, want, atol=1e-6)
    hint = typing.get_type_hints(type(model.unwrap_python_model()).predict)["model_input"]
    assert hint is np.ndarray and _signature_cannot_be_inferred_from_type_hint(hint)


def _trigger(tmp_path: Path) -> Path:
    from mimic.triggers import white_patch

    white_patch().save_npz(tmp_path / "trigger.npz")
    return tmp_path / "trigger.npz"


def test_tiny_demo_prints_table_and_json(tmp_path, capsys):
    rc = main(["demo", "--profile", "tiny", "--out", str(tmp_path / "demo"), "--json", str(tmp_path / "demo.json"), "--quiet"])
    res = json.loads((tmp_path / "demo.json").read_text())
    assert rc == (0 if res["verdict"]["passed"] else 3)  # exit code 3: the gate rejected the student
    assert REQUIRED | {"clean_ca", "clean_asr"} <= set(res)
    assert res["environment"]["seed"] == 0 and res["environment"]["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "MI weights" in out
    for name in ("clean.pt", "teacher.pt", "student.safetensors", "results.json"):
        assert (tmp_path / "demo" / name).exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimic.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "notes.pt").write_text("this is not a model")
    data = write_npz(tmp_path / "d.npz", n_train=40, n_test=20)
    cases = [
        (["fingerprint", str(tmp_path / "missing.pt")], "missing.pt"),
        (["fingerprint", str(tmp_path / "notes.pt")], "notes.pt"),
        (["audit", "--teacher", str(tmp_path / "notes.pt"), "--data", str(data)], "notes.pt"),
        (["demo", "--set", "distill.epochs=-1"], "epochs"),
        (["demo", "--profile", "nope"], "unknown profile"),
        (["demo", "--threads", "0"], "--threads must be at least 1"),
    ]
    for args, needle in cases:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("mimic: error:") and needle in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_threads_option_sets_torch_threads(tiny_encoder, tmp_path):
    from mimic.checkpoints import save_encoder

    save_encoder(tmp_path / "e.pt", tiny_encoder)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["fingerprint", str(tmp_path / "e.pt"), "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_clean_set_smaller_than_a_batch_is_refused(tiny_encoder, tmp_path):
    from mimic.checkpoints import save_encoder

    save_encoder(tmp_path / "t.pt", tiny_encoder)
    data = write_npz(tmp_path / "d.npz", n_train=8, n_test=8)
    r = _cli("audit", "--teacher", str(tmp_path / "t.pt"), "--data", str(data), "--profile", "tiny", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "fewer than one batch" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()  # refused before anything is written


def test_import_mimic_stays_light():
    code = "import sys, mimic, mimic.cli, mimic.audit; print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect','mlflow','dvc','boto3'}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_verbose_logs_timestamped_debug_lines_and_quiet_hides_them(tmp_path):
    """-v: DEBUG lines with a timestamp and the logger on stderr (the resolved config); default and -q: none;
    --log-format json: the same record as one JSON object per line."""
    import re

    def run(*flags):
        return _cli("data", "--profile", "tiny", "--out", str(tmp_path / "d.npz"), *flags, cwd=tmp_path)

    verbose = run("-v")
    line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d DEBUG mimic\.cli\.commands: config: .*profile tiny.*width 4")
    assert verbose.returncode == 0 and any(line.match(x) for x in verbose.stderr.splitlines()), verbose.stderr
    for flags in ((), ("-q",)):
        r = run(*flags)
        assert r.returncode == 0 and "DEBUG" not in r.stderr, (flags, r.stderr)
    quiet, default = run("-q"), run()
    assert quiet.stdout == default.stdout and "data:" in quiet.stdout  # -q quietens the logs, not the result line
    js = run("-v", "--log-format", "json")
    rec = [json.loads(x) for x in js.stderr.splitlines() if x.startswith("{")]
    assert any(r["level"] == "DEBUG" and r["logger"] == "mimic.cli.commands" and re.match(r"\d{4}-\d\d-\d\dT", r["time"])
               for r in rec), js.stderr
