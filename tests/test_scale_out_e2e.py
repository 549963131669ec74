"""Scale-out end to end (issue 16, item 5): a Prefect server on loopback, a process work pool with two
workers, a moto S3 prefix holding 6 teachers (3 distinct fingerprints + 3 copies under other names).
A watch tick submits them as runs of the audit deployment: exactly 3 runs, both workers take work,
no teacher is distilled twice; an audit process killed mid-run leaves a Crashed run that the next
tick schedules again and that then completes. Slow (minutes): `pytest -m slow`."""

from __future__ import annotations

import os
import signal
import time

import pytest

from scale_out_rig import LIMIT, create_pool, prefect_server, runs_of, start_worker, upload_teachers
from services import OPEN_GATE, stop_process

pytestmark = pytest.mark.slow
POOL = "mimic-e2e"


@pytest.fixture
def api(tmp_path, monkeypatch):
    with prefect_server(tmp_path / "prefect-home") as url:
        monkeypatch.setenv("PREFECT_API_URL", url)
        yield url


def test_two_workers_audit_three_teachers_once_and_a_killed_audit_is_retried(api, s3_env, tmp_path):
    from prefect import get_client

    from flows.params import Services, Settings
    from flows.watch import tick_of, watch_flow

    bucket = s3_env
    upload_teachers(bucket, tmp_path, distinct=3, copies=3)
    dep_id = create_pool(POOL)
    logs = {n: tmp_path / f"{n}.log" for n in ("w1", "w2")}
    workers = {n: start_worker(POOL, n, log) for n, log in logs.items()}
    services = Services(track=False, cache=str(tmp_path / "cache"), store=f"s3://{bucket}/store",
                        dvc_registry=str(tmp_path / "dvc"), accelerator_limit=LIMIT)

    def tick() -> dict:
        return tick_of(watch_flow(location=f"s3://{bucket}/incoming", data="synthetic", settings=Settings(profile="tiny", overrides=list(OPEN_GATE)),
                                  services=services, ledger=str(tmp_path / "watch"), out_root=str(tmp_path / "audits"),
                                  deployment="mimic-audit/audit", return_state=True))

    try:
        first = tick()
        assert len(first["submitted"]) == 6 and len({s["flow_run"] for s in first["submitted"]}) == 3, first
        killed = None
        deadline = time.monotonic() + 1500
        with get_client(sync_client=True) as c:
            while time.monotonic() < deadline:
                runs = runs_of(c, dep_id)
                if killed is None:  # kill the first audit that is running, mid-run
                    running = [r for r in runs if r.state.type.value == "RUNNING" and r.infrastructure_pid]
                    if running:
                        killed = running[0]
                        time.sleep(3)
                        os.kill(int(str(killed.infrastructure_pid).rsplit(":", 1)[-1]), signal.SIGKILL)
                elif any(r.id == killed.id and r.state.type.value == "CRASHED" for r in runs):
                    again = tick()  # the next watch tick finds it crashed and schedules it again
                    assert [s["resubmitted"] for s in again["submitted"] if s["flow_run"] == str(killed.id)][0], again
                if len(runs) == 3 and all(r.state.type.value == "COMPLETED" for r in runs) and killed is not None:
                    break
                time.sleep(2)
            runs = runs_of(c, dep_id)
        states = {str(r.id): r.state.name for r in runs}
        assert len(runs) == 3 and all(r.state.type.value == "COMPLETED" for r in runs), states
        assert killed is not None and next(r for r in runs if r.id == killed.id).run_count >= 2
        # both workers took work (each worker logs the runs it submits)
        took = {n: {str(r.id) for r in runs if str(r.id) in log.read_text()} for n, log in logs.items()}
        assert all(took.values()), took
        # no teacher distilled twice: one finished distillation per teacher in the shared stage cache
        finished = [d for d in (tmp_path / "cache" / "distill").iterdir() if (d / "stage.json").exists()]
        assert len(finished) == 3, finished
        final = tick()  # everything done: the same 3 runs, nothing submitted again
        assert len({s["flow_run"] for s in final["submitted"]}) == 3, final
        assert not any(s["resubmitted"] for s in final["submitted"]), final
        print(f"observed: {len(first['submitted'])} files -> {len(runs)} runs, states {sorted(states.values())}, "
              f"killed run ran {next(r for r in runs if r.id == killed.id).run_count} times, "
              f"runs per worker { {n: len(t) for n, t in took.items()} }, finished distillations {len(finished)}")
    finally:
        for w in workers.values():
            stop_process(w, timeout=10)
