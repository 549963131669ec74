"""`scenarios/cifar10/report.py`: compare (through `dvc metrics diff`) and write (the template)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "scenarios" / "cifar10" / "report.py"
METRICS = ("teacher", "mimic")


def metrics(name: str, ca: float, asr: float) -> str:
    probes = {p: {"probe": p, "ca": ca + i, "asr": asr + i} for i, p in enumerate(("linear", "mlp"))}
    return json.dumps({"encoders": {name: probes}, "target_class": 9, "seconds": 1.0})


def record(fingerprint: str) -> str:
    return json.dumps({"path": "distill/mimic/student.pt", "fingerprint": fingerprint, "seconds": 1.0})


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def scenario(tmp_path) -> Path:
    """A committed DVC scenario folder: two encoders' metrics (declared in dvc.yaml), one model record
    and one MI record."""
    (tmp_path / "metrics").mkdir()
    (tmp_path / "dvc.yaml").write_text("metrics:\n" + "".join(f"  - metrics/{n}.json\n" for n in METRICS))
    (tmp_path / "metrics" / "teacher.json").write_text(metrics("teacher", 46.0, 99.5))
    (tmp_path / "metrics" / "mimic.json").write_text(metrics("mimic", 45.64, 5.06))
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "mimic.json").write_text(record("aaaa"))
    (tmp_path / "records" / "mi-teacher.json").write_text(json.dumps({"fingerprint": "tttt", "seconds": 1.0}))
    git(tmp_path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, capture_output=True)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "reference")
    return tmp_path


def compare(root: Path, *extra: str) -> tuple[int, dict, str]:
    out = root / "compare.json"
    r = subprocess.run([sys.executable, str(REPORT), "compare", "--dir", str(root), "--json", str(out), *extra],
                       capture_output=True, text=True)
    return r.returncode, (json.loads(out.read_text()) if out.exists() else {}), r.stdout + r.stderr


def test_a_rerun_within_tolerance_is_reproduced(scenario):
    (scenario / "metrics" / "mimic.json").write_text(metrics("mimic", 46.5, 4.2))  # +0.86 CA, -0.86 ASR
    rc, res, out = compare(scenario)
    assert rc == 0, out
    assert res["reproduced"] and res["max_abs_delta"] == pytest.approx(0.86)
    assert len(res["rows"]) == 8  # 2 encoders x 2 probes x (CA, ASR)
    assert res["models"] == {"distill/mimic/student.pt": {"ref": "aaaa", "now": "aaaa", "identical": True}}
    assert res["models_identical"] == 1  # the MI record names no model
    assert "reproduced: max |delta| 0.86 points" in out


def test_a_value_outside_tolerance_fails_and_is_flagged(scenario):
    (scenario / "metrics" / "mimic.json").write_text(metrics("mimic", 45.64, 7.2))  # ASR +2.14
    (scenario / "records" / "mimic.json").write_text(record("bbbb"))
    rc, res, out = compare(scenario)
    assert rc == 1
    assert not res["reproduced"] and res["outside_tolerance"] == 2  # linear and MLP ASR
    assert res["models"]["distill/mimic/student.pt"] == {"ref": "aaaa", "now": "bbbb", "identical": False}
    assert "<-- outside" in out and "NOT reproduced" in out
    rc, res, _ = compare(scenario, "--tol", "3")
    assert rc == 0 and res["reproduced"]


def test_a_missing_rerun_is_not_reproduced(scenario):
    (scenario / "metrics" / "mimic.json").unlink()
    (scenario / "records" / "mimic.json").unlink()
    rc, res, out = compare(scenario)
    assert rc == 1 and res["missing"] == ["metrics/mimic.json not in the working tree"], out
    assert res["models"]["distill/mimic/student.pt"]["now"] is None and res["models_identical"] == 0
    assert "NOT reproduced" in out


def test_a_probe_added_since_the_reference_is_named_not_the_whole_file(scenario):
    m = json.loads(metrics("mimic", 45.64, 5.06))
    m["encoders"]["mimic"]["linear_z"] = {"probe": "linear_z", "ca": 44.0, "asr": 1.0}
    (scenario / "metrics" / "mimic.json").write_text(json.dumps(m))
    rc, res, out = compare(scenario)
    assert rc == 1 and res["missing"] == ["metrics/mimic.json: probe mimic linear_z not at the revision"], out
    assert res["max_abs_delta"] == 0  # the probes both sides have are unchanged


def test_seconds_and_environment_are_not_results(scenario):
    """`dvc metrics diff` reports every numeric field; only CA/ASR count for a reproduction."""
    m = json.loads(metrics("mimic", 45.64, 5.06))
    (scenario / "metrics" / "mimic.json").write_text(json.dumps({**m, "seconds": 99.0, "environment": {"threads": 2}}))
    rc, res, out = compare(scenario)
    assert rc == 0 and res["reproduced"], out
    assert {r["metric"] for r in res["rows"]} == {"ca", "asr"} and res["max_abs_delta"] == 0


def test_write_renders_the_numbers_of_the_metrics_files(tmp_path):
    """The page is the template filled with facts read from the scenario's files: change a metric,
    and the page changes with it."""
    import shutil

    scen = tmp_path / "cifar10"
    shutil.copytree(REPORT.parent, scen, ignore=shutil.ignore_patterns("models", "distill", "runs", "mi"))
    out = tmp_path / "results.md"
    (scen / "metrics" / "mimic.json").write_text(metrics("mimic", 41.23, 7.89))

    def write() -> str:
        r = subprocess.run([sys.executable, str(scen / "report.py"), "write", "--out", str(out), "--img",
                            str(tmp_path / "img")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return out.read_text()

    page = write()
    row = next(line for line in page.splitlines() if line.startswith("| **MIMIC**"))
    assert "| 41.2 | 7.9 | 42.2 | 8.9 |" in row
    assert "MIMIC student ASR <= max(5, clean ASR + 2)" in page and "{{" not in page and "{%" not in page
    (scen / "metrics" / "mimic.json").unlink()
    page = write()
    assert "| **MIMIC** (MI on teacher, all terms, empty student) | not run |" in page
    assert "The main result (clean, teacher, MIMIC) has not been evaluated yet." in page


def test_unknown_revision_is_a_one_line_error(scenario):
    rc, res, out = compare(scenario, "--rev", "no-such-rev")
    assert rc == 2 and res == {}
    assert out.strip().startswith("error:") and "Traceback" not in out and len(out.strip().splitlines()) == 1
