"""Scale-out on Prefect (issue 16): the watch submits each teacher as one run of the audit deployment
(the API's idempotency key is the claim), a crashed run is scheduled again, and computing stages hold
a slot of a global concurrency limit. Against Prefect's test harness (a real temporary API); no
worker runs here: the runs are read back from the API (tests/test_scale_out_e2e.py runs workers)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from mimic.checkpoints import save_encoder
from mimic.encoders import Encoder, EncoderSpec

DEPLOYMENT = "mimic-audit/audit"


def _teachers(folder: Path, n: int = 3) -> None:
    """``n`` distinct encoders, each also under a second name (one of them a copy in a subfolder)."""
    folder.mkdir()
    (folder / "dups").mkdir()
    for i in range(n):
        torch.manual_seed(100 + i)
        save_encoder(folder / f"model-{i}.pt", Encoder(EncoderSpec(width=4)).eval())
        shutil.copy(folder / f"model-{i}.pt", folder / "dups" / f"same-as-{i}.pt")


@pytest.fixture
def audit_deployment(pipeline_env):
    """The audit flow registered as a deployment on a process work pool of the harness's API."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name="mimic-test", type="process"))
        except Exception:  # noqa: BLE001 - created by an earlier test of the session
            pass
        flow_id = c.create_flow_from_name("mimic-audit")
        dep_id = c.create_deployment(flow_id=flow_id, name="audit", work_pool_name="mimic-test",
                                     entrypoint="flows/audit.py:audit_flow")
        for run in c.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep_id]))):
            c.delete_flow_run(run.id)  # runs of an earlier test of the session

    def runs() -> list:
        with get_client(sync_client=True) as c:
            return c.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[dep_id])))

    return runs


def _tick(incoming: Path, ledger: str, **kw) -> dict:
    from flows.params import Services, Settings
    from flows.watch import tick_of, watch_flow

    state = watch_flow(location=str(incoming), data="synthetic", settings=Settings(profile="tiny"),
                       services=Services(track=False, accelerator_limit="mimic-accelerator"), ledger=ledger,
                       deployment=DEPLOYMENT, return_state=True, **kw)
    return tick_of(state)


def test_watchers_submit_each_teacher_once_and_a_crashed_run_again(audit_deployment, pipeline_env):
    from prefect import get_client
    from prefect.states import Completed, Crashed

    incoming = pipeline_env / "incoming"
    _teachers(incoming)
    first = _tick(incoming, "runs/watch-a")
    assert first["audited"] == [] and first["failed"] == [], first  # nothing audited in the watcher's process
    assert len(first["submitted"]) == 6, first
    by_fp: dict[str, set] = {}
    for s in first["submitted"]:
        by_fp.setdefault(s["fingerprint"], set()).add(s["flow_run"])
    assert len(by_fp) == 3 and all(len(r) == 1 for r in by_fp.values()), by_fp  # 3 teachers, one run each
    runs = audit_deployment()
    assert len(runs) == 3 and {str(r.id) for r in runs} == set().union(*by_fp.values())
    assert all(r.state.type.value == "SCHEDULED" for r in runs)
    assert all(r.idempotency_key and r.idempotency_key.startswith("mimic-audit-") for r in runs)
    one = runs[0]
    assert one.parameters["services"]["accelerator_limit"] == "mimic-accelerator"  # handed on to the audit
    assert one.parameters["audit"]["data"] == "synthetic" and one.parameters["progress"] is False

    # a second watcher (its own ledger, e.g. another machine) sees the same files: no new run
    second = _tick(incoming, "runs/watch-b")
    assert {s["flow_run"] for s in second["submitted"]} == {str(r.id) for r in runs}
    assert len(audit_deployment()) == 3
    assert not any(s["resubmitted"] for s in second["submitted"])

    # a worker dies mid-audit: the run is Crashed; the next tick schedules it again, once
    crashed, done = runs[0], runs[1]
    with get_client(sync_client=True) as c:
        c.set_flow_run_state(crashed.id, Crashed(message="worker killed"), force=True)
        c.set_flow_run_state(done.id, Completed(), force=True)
    third = _tick(incoming, "runs/watch-a")
    again = [s for s in third["submitted"] if s["flow_run"] == str(crashed.id)]
    assert len(again) == 2 and again[0]["resubmitted"] and again[1]["state"] == "Scheduled", third  # one file, then its copy
    assert not any(s["resubmitted"] for s in third["submitted"] if s["flow_run"] != str(crashed.id))
    states = {str(r.id): r.state.type.value for r in audit_deployment()}
    assert len(states) == 3 and states[str(crashed.id)] == "SCHEDULED" and states[str(done.id)] == "COMPLETED"

    # a changed configuration is another audit: a new run per teacher
    from flows.params import Services, Settings
    from flows.watch import tick_of, watch_flow

    other = tick_of(watch_flow(location=str(incoming), data="synthetic", settings=Settings(profile="tiny", overrides=["distill.epochs=3"]),
                               services=Services(track=False), ledger="runs/watch-a", deployment=DEPLOYMENT, return_state=True))
    assert len({s["flow_run"] for s in other["submitted"]} - set(states)) == 3
    assert len(audit_deployment()) == 6


def test_a_computing_stage_holds_a_slot_of_the_concurrency_limit(pipeline_env):
    """The slot is taken inside a stage that computes (seen as an active slot while it runs) and
    not by a cached stage; a limit that does not exist is an error, not a silent free-for-all."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from mimic.cache import StageCache
    from mimic.config import load_config
    from prefect import flow

    from mimic.inputs import load_data
    from mimic.stages.pretrain import plan_pretrain
    from tasks.stages import prefect_runner

    cfg = load_config(profile="tiny", sets=["pretrain.epochs=1"])
    ds = load_data(cfg)
    seen: list[int] = []

    with get_client(sync_client=True) as c:
        try:
            c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="mimic-accelerator-t", limit=1))
        except Exception:  # noqa: BLE001 - already there from an earlier run of the session
            pass

    def active() -> int:
        with get_client(sync_client=True) as c:
            return c.read_global_concurrency_limit_by_name("mimic-accelerator-t").active_slots

    cache = StageCache(pipeline_env / "cache")
    plain = plan_pretrain(cfg, ds, progress=False)

    def watched(slot, cache_):
        seen.append(active())
        return plain.compute(slot, cache_)

    plan = dataclasses.replace(plain, compute=watched)

    @flow
    def one(limit: str):
        return prefect_runner(cache, slot_limit=limit)(plan)

    run = one("mimic-accelerator-t")
    assert seen == [1] and not run.cached  # held while it computed
    assert active() == 0  # and given back
    again = one("mimic-accelerator-t")
    assert again.cached and seen == [1]  # cached: computed nothing, held nothing
    cache2 = StageCache(pipeline_env / "cache2")

    @flow
    def missing():
        return prefect_runner(cache2, slot_limit="no-such-limit")(plan_pretrain(cfg, ds, progress=False))

    with pytest.raises(Exception, match="no-such-limit|not found|does not exist"):
        missing()


def test_watch_to_a_deployment_needs_a_prefect_server(tmp_path, monkeypatch, capsys):
    from mimic.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "incoming").mkdir()
    rc = main(["watch", str(tmp_path / "incoming"), "--data", "synthetic", "--once", "--deployment", DEPLOYMENT,
               "--ledger", str(tmp_path / "ledger"), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "PREFECT_API_URL" in err[0], err
