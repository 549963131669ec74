"""scenarios/parallel_repro.py: `dvc repro` with J stage commands at a time, on a real DVC repository
with stages that record when they ran. No timing assertions: only whether two commands overlapped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scenarios" / "parallel_repro.py"

# a and b are independent (each records its start and end), c needs both, bad fails, after_bad needs bad
STAMP = "python -c \"import sys,time;s=time.time();time.sleep(1.0);open(sys.argv[1],'w').write(f'{s} {time.time()}')\""
DVC_YAML = f"""
stages:
  a:
    cmd: {STAMP} a.txt
    outs: [a.txt]
  b:
    cmd: {STAMP} b.txt
    outs: [b.txt]
  c:
    cmd: cat a.txt b.txt > c.txt
    deps: [a.txt, b.txt]
    outs: [c.txt]
  bad:
    cmd: exit 3
    deps: [a.txt]
    outs: [bad.txt]
  after_bad:
    cmd: cat bad.txt > d.txt
    deps: [bad.txt]
    outs: [d.txt]
"""


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(*cmd, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert not check or r.returncode == 0, f"{cmd}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    _run("git", "init", "-q", cwd=tmp_path)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def _span(path: Path) -> tuple[float, float]:
    start, end = map(float, path.read_text().split())
    return start, end


def _status(repo: Path) -> dict:
    return json.loads(_run(sys.executable, "-m", "dvc", "status", "--json", cwd=repo).stdout or "{}")


def test_independent_stages_overlap_and_dvc_sees_them_committed(repo):
    r = _run(sys.executable, str(RUNNER), "-j", "2", "c", "--json", "out.json", cwd=repo)
    (a0, a1), (b0, b1) = _span(repo / "a.txt"), _span(repo / "b.txt")
    assert max(a0, b0) < min(a1, b1), "a and b did not run at the same time"
    assert (repo / "c.txt").read_text() == (repo / "a.txt").read_text() + (repo / "b.txt").read_text()
    out = json.loads((repo / "out.json").read_text())
    assert out["counts"] == {"ran": 3, "unchanged": 0, "failed": 0, "skipped": 0}
    assert [s["stage"] for s in out["stages"]][-1] == "c"
    assert set(_status(repo)) == {"bad", "after_bad"}          # a, b, c: what dvc repro would have locked
    assert "3 ran" in r.stderr
    again = _run(sys.executable, str(RUNNER), "-j", "2", "c", "--json", "out.json", cwd=repo)
    assert json.loads((repo / "out.json").read_text())["counts"]["unchanged"] == 3, again.stderr
    _run(sys.executable, "-m", "dvc", "repro", "c", cwd=repo)   # DVC agrees: nothing to do, a.txt unchanged
    assert _span(repo / "a.txt") == (a0, a1)


def test_one_job_runs_one_command_at_a_time(repo):
    _run(sys.executable, str(RUNNER), "-j", "1", "c", cwd=repo)
    (a0, a1), (b0, b1) = _span(repo / "a.txt"), _span(repo / "b.txt")
    assert a1 <= b0 or b1 <= a0


def test_a_failed_stage_skips_its_dependents_and_the_rest_is_committed(repo):
    r = _run(sys.executable, str(RUNNER), "-j", "2", "dvc.yaml", "--json", "out.json", cwd=repo, check=False)
    assert r.returncode == 1
    out = {s["stage"]: s for s in json.loads((repo / "out.json").read_text())["stages"]}
    assert out["bad"]["status"] == "failed" and out["bad"]["returncode"] == 3
    assert out["after_bad"]["status"] == "skipped"
    assert {out[k]["status"] for k in ("a", "b", "c")} == {"ran"}
    assert not (repo / "d.txt").exists()
    assert set(_status(repo)) == {"bad", "after_bad"}
    assert "Traceback" not in r.stderr


def test_an_unknown_target_is_a_one_line_error(repo):
    r = _run(sys.executable, str(RUNNER), "nope", cwd=repo, check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
