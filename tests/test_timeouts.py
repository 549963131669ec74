"""Every stage and every flow task is bounded by a ``timeouts.*`` key, and past it fails with one line
naming the stage (or task) and the setting that raises the bound (issue 11 rule 5b, issue 15)."""

from __future__ import annotations

import ast
import importlib
import pickle
import pkgutil
import time
from pathlib import Path

import pytest

from mimic.config import load_config
from mimic.errors import StageTimeout

ROOT = Path(__file__).resolve().parents[1]


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def cli_logging():
    """``mimic.cli.main`` installs a root handler on the (captured) stderr: take it away afterwards, so the
    Prefect tests in this module do not log into a closed stream."""
    import logging

    import mimic.cli

    root, mimic_log = logging.getLogger(), logging.getLogger("mimic")
    before = (list(root.handlers), root.level, mimic_log.level)
    yield
    for h in root.handlers[:]:
        if h not in before[0]:
            root.removeHandler(h)
    root.setLevel(before[1])
    mimic_log.setLevel(before[2])
    mimic.cli._handler = None


# --- the direct runner (mimic demo, stage commands; no Prefect) --------------------------------------


def test_a_stage_past_timeouts_stage_stops_the_demo_with_one_line(capsys, cli_logging):
    from mimic.cli import main

    t0 = time.perf_counter()
    code = main(["demo", "--profile", "tiny", "--set", "timeouts.stage=0.001", "--out", "out", "-q"])
    err = _one_line(capsys.readouterr().err)
    assert code != 0
    assert err == ("mimic: error: stage 'pretrain' exceeded timeouts.stage=0.001 s; "
                   "raise it with --set timeouts.stage=SECONDS (0 = no limit)")
    assert time.perf_counter() - t0 < 30
    assert not Path("out/results.json").exists()


@pytest.mark.parametrize("command", [
    ["pretrain", "--data", "synthetic", "--out", "clean.pt"],
    ["mi", "--teacher", "TEACHER", "--data", "synthetic", "--out", "mi"],
])
def test_a_stage_command_past_timeouts_stage_stops_with_one_line(capsys, cli_logging, tiny_teachers, tmp_path, command):
    from mimic.cli import main

    argv = [a.replace("TEACHER", str(tiny_teachers["teacher"])) for a in command]
    code = main([*argv, "--profile", "tiny", "--set", "timeouts.stage=0.001", "--cache", str(tmp_path / "cache"), "-q"])
    err = _one_line(capsys.readouterr().err)
    assert code != 0
    assert err == (f"mimic: error: stage '{argv[0]}' exceeded timeouts.stage=0.001 s; "
                   "raise it with --set timeouts.stage=SECONDS (0 = no limit)")


def test_a_timed_out_stage_leaves_no_finished_slot_and_its_lock_free(tiny_teachers):
    """The audit's first stage (scan-teacher) is stopped; run again without the bound it computes normally."""
    from mimic.audit import AuditRequest, run_audit
    from mimic.cache import StageCache

    req = AuditRequest(teacher=str(tiny_teachers["teacher"]), data="synthetic")
    with pytest.raises(StageTimeout, match=r"^stage 'scan-teacher' exceeded timeouts\.stage=0\.001 s; raise it"):
        run_audit(load_config(profile="tiny", sets=["timeouts.stage=0.001"]), req, root="cache", out_dir="out",
                  progress=False)
    assert not list(StageCache("cache").root.glob("scan/*/stage.json"))
    res = run_audit(load_config(profile="tiny", sets=["timeouts.stage=0.0", "timeouts.lock=5"]), req, root="cache",
                    out_dir="out", progress=False)
    assert Path(res["out"], "results.json").exists() and not res["cached"]["scan-teacher"]


def test_stage_deadline_raises_past_the_bound_and_leaves_no_timer_behind():
    import signal

    from mimic.audit import stage_deadline

    with pytest.raises(StageTimeout) as info, stage_deadline("distill", 0.05):
        time.sleep(5)  # a blocking call is stopped too
    assert str(info.value) == ("stage 'distill' exceeded timeouts.stage=0.05 s; raise it with --set "
                               "timeouts.stage=SECONDS (0 = no limit)")
    with stage_deadline("mi", 5):
        pass
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    with stage_deadline("mi", None):  # 0 / None: no bound
        time.sleep(0.01)


def test_stage_timeout_survives_pickling_as_prefect_stores_it():
    exc = pickle.loads(pickle.dumps(StageTimeout("task 'fetch-teacher'", 3600, "timeouts.transfer")))
    assert str(exc) == ("task 'fetch-teacher' exceeded timeouts.transfer=3600 s; raise it with --set "
                        "timeouts.transfer=SECONDS (0 = no limit)")


def test_timeouts_are_validated_and_documented():
    t = load_config().timeouts
    assert t.stage > 0 and t.transfer > 0 and t.service > 0 and t.lock > 0
    defaults = (ROOT / "mimic" / "defaults.yaml").read_text()
    for key in ("lock", "stage", "transfer", "service", "claim"):
        assert f"\n  {key}: " in defaults.split("\ntimeouts:")[1].split("\n\n")[0], key
    from mimic.errors import ConfigError

    with pytest.raises(ConfigError, match="timeouts"):
        load_config(sets=["timeouts.service=-1"])


# --- the Prefect flow ----------------------------------------------------------------------------


def _audit(teacher: Path, *sets: str, **services):
    from flows.audit import audit_flow
    from flows.params import AuditInput, Services, Settings

    return audit_flow(AuditInput(teacher=str(teacher), data="synthetic"), Settings(profile="tiny", overrides=list(sets)),
                      Services(**services), progress=False, return_state=True)


def test_a_stage_past_timeouts_stage_ends_the_flow_run_failed_with_one_line(pipeline_env, tiny_teachers):
    from flows.audit import results_of

    state = _audit(tiny_teachers["teacher"], "timeouts.stage=0.001", track=False)
    assert state.is_failed()
    line = "stage 'scan-teacher' exceeded timeouts.stage=0.001 s; raise it with --set timeouts.stage=SECONDS (0 = no limit)"
    assert line in state.message and "\n" not in state.message, state.message
    with pytest.raises(StageTimeout, match="scan-teacher"):
        results_of(state)


def test_a_flow_task_past_its_timeout_ends_the_flow_run_failed_with_one_line(pipeline_env, tiny_teachers):
    state = _audit(tiny_teachers["teacher"], "timeouts.transfer=0.001", track=False)
    assert state.is_failed()
    assert "task 'fetch-teacher' exceeded timeouts.transfer=0.001 s; raise it with --set timeouts.transfer=SECONDS" \
        in state.message, state.message


def _tasks() -> dict[str, object]:
    """Every Prefect task object defined in tasks/ and flows/ (by name)."""
    from prefect import Task

    import flows
    import tasks

    found = {}
    for pkg in (tasks, flows):
        for mod in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
            found.update({v.name: v for v in vars(module).values() if isinstance(v, Task)})
    return found


def test_every_task_of_tasks_and_flows_gets_a_timeout_from_its_timeouts_key():
    from tasks.common import TIMEOUTS, bounded

    found = _tasks()
    assert len(found) >= 13, sorted(found)
    assert set(found) <= set(TIMEOUTS), f"tasks without a timeouts key in tasks.common.TIMEOUTS: {set(found) - set(TIMEOUTS)}"
    cfg = load_config(sets=["timeouts.transfer=11", "timeouts.service=22"])
    for name, t in found.items():
        want = {"transfer": 11, "service": 22}[TIMEOUTS[name]]
        assert bounded(t, cfg.timeouts).timeout_seconds == want, name
    assert bounded(found["fetch-teacher"], load_config(sets=["timeouts.transfer=0"]).timeouts).timeout_seconds is None


@pytest.mark.parametrize("module", ["tasks.teacher", "tasks.storage", "tasks.observe", "tasks.registry",
                                    "tasks.tracking", "flows.audit"])
def test_the_task_decorators_carry_the_package_defaults(module):
    from prefect import Task

    from tasks.common import TIMEOUTS

    defaults = load_config().timeouts
    found = [v for v in vars(importlib.import_module(module)).values() if isinstance(v, Task) and v.fn.__module__ == module]
    assert found
    for t in found:
        assert t.timeout_seconds == getattr(defaults, TIMEOUTS[t.name]), t.name


def test_the_audit_flow_calls_every_task_through_its_bound():
    """Each task the audit flow uses is run by ``tasks.common.call`` (the run's timeouts, translated errors)."""
    from prefect import Task

    import flows.audit as fa

    names = {k for k, v in vars(fa).items() if isinstance(v, Task)}
    tree = ast.parse(Path(fa.__file__).read_text())
    bare, through = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "call" and node.args and isinstance(node.args[0], ast.Name):
                through.add(node.args[0].id)
            elif isinstance(f, ast.Name) and f.id in names:
                bare.append(f.id)
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in names:
                bare.append(f"{f.value.id}.{f.attr}")
    assert not bare, f"tasks called without tasks.common.call: {bare}"
    assert through == names, (through, names)
    assert "prefect_runner(cache, timeout_seconds=cfg.timeouts.stage or None" in Path(fa.__file__).read_text()
