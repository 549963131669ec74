"""Slow end-to-end runs: the acceptance scenarios of the demo (run with `pytest -m slow`)."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_CIFAR
from mimic.cli import main

pytestmark = pytest.mark.slow


def _check(res: dict) -> None:
    assert res["teacher_asr"] >= 90, res
    assert res["student_asr"] <= 10, res
    assert abs(res["student_ca"] - res["teacher_ca"]) <= 5, res


def test_demo_on_builtin_data_removes_the_backdoor(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--json", str(tmp_path / "r.json"), "--quiet"]) == 0
    _check(json.loads((tmp_path / "r.json").read_text()))


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"CIFAR-10 not found at {SHARED_CIFAR}")
def test_demo_on_cifar10_removes_the_backdoor(tmp_path):
    args = ["demo", "--data", str(SHARED_CIFAR), "--out", str(tmp_path / "demo"), "--json", str(tmp_path / "r.json"), "--quiet"]
    assert main(args) == 0
    _check(json.loads((tmp_path / "r.json").read_text()))
