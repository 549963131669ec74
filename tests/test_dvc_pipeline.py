"""The root DVC pipeline as its users drive it: `dvc repro`, `dvc exp run -S`, `dvc metrics diff`, on a
copy of the repository with the tiny profile's values in params.yaml. Slow (minutes): `pytest -m slow`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mimic.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_repro_then_experiments_change_only_the_audit_outcome(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "mimic", repo / "mimic", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / f, repo / f)
    params = {k: v for k, v in load_config(profile="tiny").to_dict().items() if k != "profile"}
    params["teacher"]["source"] = "models/demo/teacher.pt"
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _run("git", "init", "-q", cwd=repo)
    _run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init", cwd=repo)
    _run("dvc", "init", "-q", cwd=repo)
    _run("dvc", "repro", cwd=repo)
    first = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(first) == {"verdict", "teacher_ca", "teacher_asr", "student_ca", "student_asr", "probes"}
    assert all(set(r) <= {"probe", "kind", "protocol", "ca", "asr"} for enc in first["probes"].values() for r in enc.values())
    # `dvc repro`'s results.json is the same document as every other front's (issue 11, rule 1)
    import jsonschema

    schema = json.loads((ROOT / "docs" / "results.schema.json").read_text())
    jsonschema.validate(json.loads((repo / "reports" / "audit" / "results.json").read_text()), schema)
    _run("git", "add", "-A", cwd=repo)
    _run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "baseline", cwd=repo)

    # nothing changed: repro is a no-op and the metrics do not differ (no timings in metrics files)
    assert "didn't change" in _run("dvc", "repro", cwd=repo) or "up to date" in _run("dvc", "status", cwd=repo)
    assert json.loads(_run("dvc", "metrics", "diff", "--json", cwd=repo) or "{}") == {}

    # an experiment on a distillation param: only the student's numbers (and the verdict) may differ
    # the stages that read no distill param are not re-run (issue 11, rule 2)
    log = _run("dvc", "exp", "run", "-S", "distill.epochs=3", cwd=repo)
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert ran == {"distill", "scan-student", "evaluate", "results"}, log[-3000:]
    diff = json.loads(_run("dvc", "metrics", "diff", "--json", cwd=repo))
    changed = {k for k in diff.get("reports/metrics.json", {})}
    assert changed, diff
    assert all(k in {"student_ca", "student_asr", "verdict"} or k.startswith("probes.student.") for k in changed), diff
    shown = json.loads(_run("dvc", "exp", "show", "--json", cwd=repo))
    assert shown  # the experiment is listed with its params and metrics
