"""The audit's stages as Prefect tasks, cached on the stage keys of ``mimic.identity``.

``prefect_runner(cache)`` is the runner the flow gives :func:`mimic.audit.run_audit`: each stage
becomes a task named after it (``mi``, ``distill``, ``evaluate-teacher``, ...). The task's cache
key *is* the stage key, and Prefect's cache record lives inside the stage's own directory
(``ROOT/<stage>/<key>/prefect-record``): one layer of identity, and a stage directory that is
deleted takes its Prefect cache record with it. A record whose stage outputs are incomplete is
discarded before Prefect looks it up.

``slot_limit`` names a Prefect global concurrency limit: a stage that computes (its outputs are not
cached yet) holds one of its slots while it runs, so N workers sharing one GPU machine never run
more than ``slots`` trainings at once; cached stages and the flow's I/O tasks hold none.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.concurrency.sync import concurrency
from prefect.task_engine import TaskRunTimeoutError

from mimic.audit import Runner
from mimic.cache import StageCache
from mimic.errors import StageTimeout
from mimic.stages.common import StagePlan, StageRun

RECORD = "prefect-record"


@dataclass
class StageKeyPolicy(CachePolicy):
    """Prefect's cache key for a stage run = the stage key (its record kept in the stage directory)."""

    stage: str = ""
    key: str = ""
    root: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        cache = StageCache(self.root)
        record = cache.dir(self.stage, self.key) / RECORD
        if cache.lookup(self.stage, self.key) is None:
            record.unlink(missing_ok=True)  # outputs gone or unfinished: the record must not answer for them
        return f"{self.stage}/{self.key}/{RECORD}"


def accelerator_slot(limit: str | None):
    """One slot of the global concurrency limit ``limit`` (strict: a limit that does not exist is an
    error, never a silent oversubscription); a no-op without one. The lease is renewed while the
    stage trains, and a failed renewal does not kill a training that is nearly done."""
    if not limit:
        return nullcontext()
    return concurrency(limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False)


def prefect_runner(cache: StageCache, *, timeout_seconds: float | None = None, slot_limit: str | None = None) -> Runner:
    """Run each stage plan as a cached Prefect task (``timeout_seconds``: Prefect's bound of one stage run,
    ``timeouts.stage``; past it the stage fails with a one-line :class:`~mimic.errors.StageTimeout`;
    ``slot_limit``: the concurrency limit a computing stage holds a slot of)."""
    root = str(Path(cache.root).resolve())

    def run(plan: StagePlan) -> StageRun:
        policy = StageKeyPolicy(stage=plan.stage, key=plan.key, root=root).configure(key_storage=root)

        def stage_task() -> dict:
            if cache.lookup(plan.stage, plan.key) is not None:
                return plan.run(cache).to_dict()  # cached: computes nothing, holds no slot
            with accelerator_slot(slot_limit):
                return plan.run(cache).to_dict()

        t = task(stage_task, name=plan.name, task_run_name=plan.name, cache_policy=policy, persist_result=True,
                 result_serializer="json", cache_result_in_memory=False, timeout_seconds=timeout_seconds)
        state = t(return_state=True)
        try:
            result = state.result()  # raises the stage's own error when it failed
        except TaskRunTimeoutError:
            raise StageTimeout(f"stage '{plan.name}'", timeout_seconds, "timeouts.stage") from None
        return StageRun.from_dict(result, cached=state.name == "Cached" or bool(result["cached"]))

    return run
