"""The scale-out rig shared by ``test_scale_out_e2e.py`` and ``benchmarks/bench_scale_out.py``: a
Prefect server on loopback, a process work pool with the audit deployment and the accelerator
limit, process workers, teachers uploaded to a (moto) S3 prefix, and the deployment's runs read back
with their timings."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from services import free_port, stop_process, venv_program, wait_http

ROOT = Path(__file__).resolve().parents[1]
LIMIT = "mimic-accelerator"


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; yields the API URL."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(venv_program("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=home)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=180, proc=proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop_process(proc)


def upload_teachers(bucket: str, tmp: Path, distinct: int, copies: int, prefix: str = "incoming") -> None:
    """``distinct`` tiny encoders (different weights) under ``prefix/model-I.pt``, the first
    ``copies`` of them once more under other names (``prefix/copies/renamed-I.pt``)."""
    import boto3
    import torch

    from mimic.checkpoints import save_encoder
    from mimic.encoders import Encoder, EncoderSpec

    s3 = boto3.client("s3")
    for i in range(distinct):
        torch.manual_seed(200 + i)
        path = tmp / f"model-{i}.pt"
        save_encoder(path, Encoder(EncoderSpec(width=4)).eval())
        keys = [f"{prefix}/model-{i}.pt"] + ([f"{prefix}/copies/renamed-{i}.pt"] if i < copies else [])
        for key in keys:
            s3.upload_file(str(path), bucket, key)


def create_pool(pool: str, slots: int = 1) -> str:
    """The process work pool, the accelerator limit and the audit deployment; returns its id."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate

    with get_client(sync_client=True) as c:
        c.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        c.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LIMIT, limit=slots))
        return str(c.create_deployment(flow_id=c.create_flow_from_name("mimic-audit"), name="audit", work_pool_name=pool,
                                       entrypoint="flows/audit.py:audit_flow", path=str(ROOT)))


def start_worker(pool: str, name: str, log: Path) -> subprocess.Popen:
    """``prefect worker start`` for ``pool`` (one thread per audit process); output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    return subprocess.Popen([str(venv_program("prefect")), "worker", "start", "--pool", pool, "--name", name, "--type", "process"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def runs_of(client, deployment_id: str) -> list:
    """Every flow run of the deployment."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))


def first_task_start(client, flow_run_id) -> datetime | None:
    """When the run's first task (stage) started, from the API's task runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    starts = [t.start_time for t in tasks if t.start_time is not None]
    return min(starts) if starts else None
