"""Crash and resume, NaN through the CLI, and determinism: real ``mimic distill`` processes on CPU.

The audit's distillation stage is the same code (``mimic.pipeline.stage_distill``) as ``mimic
distill``, which is what runs here, as separate processes of the installed ``mimic`` command:

* ``kill -9`` in the middle of distillation, then the same command again: it resumes from the last
  checkpoint (losing at most the epoch in progress) and ends with the student an uninterrupted run
  produces, bit for bit;
* a checkpoint torn mid-file: the previous one (``prev.pt``) is used; both torn: a one-line error;
* a NaN loss: exit 2 with one line naming the epoch and step, the last good checkpoint intact (the
  same command then resumes from it and reaches the uninterrupted run's student);
* two separate processes with the same teacher, data, params and seed: bit-identical students; the
  results JSON records torch version, device, seed and git revision.

Processes run with ``OMP_NUM_THREADS=1`` (the same setting for every run, and fast for tiny models).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mimic.checkpoints import load_encoder, load_state
from mimic.errors import CheckpointError
from mimic.fingerprint import fingerprint_encoder
from mimic.training import _load_latest

EPOCHS = 8
_EXE = Path(sys.executable).with_name("mimic")
MIMIC = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "mimic.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 180

# NaN from the first step of epoch 2: the tiny profile's 80 clean images make 2 steps of 32 per epoch.
NAN_AT_CALL = 3
NAN_DRIVER = f"""
import sys
import mimic.distill as d
real, calls = d.nt_xent, [0]
def nan_loss(*a, **k):
    calls[0] += 1
    out = real(*a, **k)
    return out * float("nan") if calls[0] >= {NAN_AT_CALL} else out
d.nt_xent = nan_loss
from mimic.cli import main
rc = main(sys.argv[1:])
print(f"nt_xent calls: {{calls[0]}}")
sys.exit(rc)
"""


def distill_args(teacher: Path, out: Path, epochs: int = EPOCHS) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--profile", "tiny", "--set", f"distill.epochs={epochs}",
            "--device", "cpu", "--out", str(out), "--cache", str(out / "cache"), "--json", str(out / "result.json"), "--quiet"]


def run(args: list[str], prefix: list[str] = MIMIC) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *args], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)


def work_dir(out: Path) -> Path:
    """The checkpoint directory of the distillation's resume lineage in the run's stage cache."""
    found = [p for p in (out / "cache" / "distill" / "runs").glob("*") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def student_fingerprint(out: Path) -> str:
    return fingerprint_encoder(load_encoder(out / "student.pt").encoder)


@pytest.fixture(scope="module")
def teacher(random_teacher) -> Path:
    return random_teacher


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, teacher) -> dict:
    """One uninterrupted run: its results JSON plus ``out``."""
    out = tmp_path_factory.mktemp("baseline")
    r = run(distill_args(teacher, out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["resumed_from_epoch"] == 0 and len(res["history"]) == EPOCHS
    return {**res, "out": out}


def test_two_processes_give_bit_identical_students(tmp_path, teacher, baseline):
    r = run(distill_args(teacher, tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["fingerprint"] == baseline["fingerprint"] == student_fingerprint(tmp_path) == student_fingerprint(baseline["out"])
    assert res["history"] == baseline["history"]  # every loss of every epoch, exactly
    a = load_encoder(tmp_path / "student.pt").encoder.state_dict()
    b = load_encoder(baseline["out"] / "student.pt").encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_results_record_the_environment(baseline, teacher):
    env = baseline["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["seed"] == 0
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert env["git"] == head and len(head) == 40
    else:
        assert "git" in env
    assert baseline["teacher"]["fingerprint"] == fingerprint_encoder(load_encoder(teacher).encoder)
    assert baseline["data"]["source"] == "synthetic" and baseline["data"]["clean_images"] == 80


def test_kill_9_mid_distillation_then_resume(tmp_path, teacher, baseline):
    args = distill_args(teacher, tmp_path)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([*MIMIC, *args], stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        try:
            deadline, epoch = time.monotonic() + TIMEOUT, 0
            while epoch < 2:
                assert proc.poll() is None, f"finished before it could be killed: {(tmp_path / 'stderr.txt').read_text()}"
                assert time.monotonic() < deadline, "no checkpoint of epoch 2 in time"
                for last in (tmp_path / "cache" / "distill" / "runs").glob("*/last.pt"):
                    try:  # written atomically: never partial, but briefly absent while prev.pt rotates
                        epoch = load_state(last)["epoch"]
                    except CheckpointError as exc:
                        assert "no such file" in str(exc), exc
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _load_latest(work_dir(tmp_path))["epoch"]  # what a resume will find (last.pt, else prev.pt)
    assert 2 <= epoch <= killed_at < EPOCHS
    assert not (tmp_path / "student.pt").exists() and not (tmp_path / "result.json").exists()

    r = run(args)  # the same command again
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["resumed_from_epoch"] == killed_at  # lost at most the epoch that was running
    assert load_encoder(tmp_path / "student.pt").meta["resumed_from_epoch"] == killed_at
    assert res["fingerprint"] == baseline["fingerprint"] == student_fingerprint(tmp_path)
    assert res["history"] == baseline["history"]


def _copy_run(baseline: dict, dst: Path) -> Path:
    """The baseline's output directory minus the final student: a run killed after its last epoch."""
    shutil.copytree(baseline["out"], dst)
    for name in ("student.pt", "result.json", "losses.json", "losses.png", "stage.json"):
        (dst / name).unlink()
    for slot in (dst / "cache" / "distill").iterdir():  # the finished stage goes; its checkpoints stay
        if slot.name != "runs" and slot.is_dir():
            shutil.rmtree(slot)
    return work_dir(dst)


def test_torn_last_checkpoint_falls_back_to_prev(tmp_path, teacher, baseline):
    out = tmp_path / "run"
    work = _copy_run(baseline, out)
    assert load_state(work / "prev.pt")["epoch"] == EPOCHS - 1
    data = (work / "last.pt").read_bytes()
    (work / "last.pt").write_bytes(data[: len(data) // 2])  # torn mid-file
    r = run(distill_args(teacher, out))
    assert r.returncode == 0, r.stderr
    assert "last.pt" in r.stderr and "truncated" in r.stderr and f"resuming from prev.pt (epoch {EPOCHS - 1})" in r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["resumed_from_epoch"] == EPOCHS - 1
    assert res["fingerprint"] == baseline["fingerprint"]


def test_no_readable_checkpoint_is_one_line_error(tmp_path, teacher, baseline, capsys):
    from mimic.cli import main

    out = tmp_path / "run"
    work = _copy_run(baseline, out)
    (work / "last.pt").write_bytes(b"")
    (work / "prev.pt").write_bytes((work / "prev.pt").read_bytes()[:100])
    rc = main(distill_args(teacher, out))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("mimic: error: ") and "last.pt: empty file" in err[0] and "no readable checkpoint left" in err[0]
    assert not (out / "student.pt").exists()


def test_nan_loss_through_cli_stops_and_keeps_last_good_checkpoint(tmp_path, teacher, baseline):
    r = run(distill_args(teacher, tmp_path), prefix=[sys.executable, "-c", NAN_DRIVER])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mimic: error: distill: loss became nan at epoch 2, step 1;")
    assert "last good checkpoint is kept" in lines[0]
    assert "nt_xent calls: 3" in r.stdout  # stopped at the first non-finite step
    work = work_dir(tmp_path)
    assert load_state(work / "last.pt")["epoch"] == 1
    assert not (tmp_path / "student.pt").exists() and not (tmp_path / "result.json").exists()

    r = run(distill_args(teacher, tmp_path))  # the same command, without the fault: resumes from epoch 1
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["resumed_from_epoch"] == 1
    assert res["fingerprint"] == baseline["fingerprint"]  # so the kept checkpoint was exactly epoch 1's
