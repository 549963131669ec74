"""benchmarks/gpu_check.sh must run unchanged the first time a GPU is lent: its CPU fallback (the same
commands at a plumbing size) runs here, in CI, and writes the JSON a GPU run would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_cpu_fallback_and_writes_json(tmp_path):
    env = {**os.environ, "PY": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "cpu-fallback" and summary["status"] == 0 and summary["errors"] == []
    rows = summary["step"]["rows"]
    assert rows and all(r["step_s"] > 0 and r["steps"] == 1 for r in rows)
    assert set(rows[0]["share"]) >= {"data", "augment", "teacher", "student", "optimizer"}
    audit = summary["audit"]
    assert audit["width"] == 4 and set(audit["stages_s"]) >= {"mi", "distill"}
    assert "gpu_check: cpu-fallback, exit 0" in r.stdout
