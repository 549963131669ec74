"""Audits per hour on a process work pool, and the scheduling overhead per audit.

    .venv/bin/python benchmarks/bench_scale_out.py [--teachers 4] [--workers 2] [--slots 1]
        [--json benchmarks/results/scale-out.json] [--markdown PATH]

The rig of ``tests/test_scale_out_e2e.py`` (``tests/scale_out_rig.py``): a Prefect server and a moto
S3 on loopback, a process work pool with the audit deployment, ``--workers`` workers, an accelerator
limit of ``--slots``, and ``--teachers`` distinct tiny encoders (``tiny`` profile, synthetic clean
set) under a watched prefix. One watch tick submits them all; the clock runs until every run is
Completed. Per run, from the Prefect API:

* scheduling overhead: from the run's creation (the tick's ``run_deployment``) to its first stage
  (task run) starting: the worker's poll, the process start, the imports and the flow's set-up;
* audit: from the first stage starting to the run's end;
* audits/hour: teachers / (last end - first submission), the whole pool's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the rig is the e2e test's (tests/ is not a package)

from scale_out_rig import LIMIT, create_pool, first_task_start, prefect_server, runs_of, start_worker, upload_teachers  # noqa: E402
from services import OPEN_GATE, moto_server, stop_process  # noqa: E402

POOL = "mimic-bench"


def _aws_env(endpoint: str, tmp: Path) -> None:
    """boto3 (here and in the workers) talks to the moto server only."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        os.environ.pop(var, None)
    empty = tmp / "aws-empty"
    empty.write_text("")
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty),
                      AWS_EC2_METADATA_DISABLED="true")


def measure(teachers: int, workers: int, slots: int, timeout: float) -> dict:
    import boto3

    with tempfile.TemporaryDirectory() as d, moto_server() as endpoint:
        tmp = Path(d)
        _aws_env(endpoint, tmp)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        upload_teachers(bucket, tmp, distinct=teachers, copies=0)
        with prefect_server(tmp / "prefect-home") as api:
            os.environ["PREFECT_API_URL"] = api  # before prefect is imported: its settings are read at import
            from prefect import get_client

            from flows.params import Services, Settings
            from flows.watch import tick_of, watch_flow

            dep_id = create_pool(POOL, slots)
            procs = [start_worker(POOL, f"w{i}", tmp / f"w{i}.log") for i in range(workers)]
            try:
                services = Services(track=False, cache=str(tmp / "cache"), store=f"s3://{bucket}/store",
                                    dvc_registry=str(tmp / "dvc"), accelerator_limit=LIMIT)
                t0 = time.monotonic()
                tick = tick_of(watch_flow(location=f"s3://{bucket}/incoming", data="synthetic",
                                          settings=Settings(profile="tiny", overrides=list(OPEN_GATE)), services=services,
                                          ledger=str(tmp / "watch"), out_root=str(tmp / "audits"),
                                          deployment="mimic-audit/audit", return_state=True))
                tick_s = time.monotonic() - t0
                with get_client(sync_client=True) as c:
                    while True:
                        runs = runs_of(c, dep_id)
                        if len(runs) == teachers and all(r.state.is_final() for r in runs):
                            break
                        if time.monotonic() - t0 > timeout:
                            raise TimeoutError(f"runs not final after {timeout:.0f} s: {[r.state.name for r in runs]}")
                        time.sleep(2)
                    firsts = {r.id: first_task_start(c, r.id) for r in runs}
                took = {f"w{i}": sum(str(r.id) in (tmp / f"w{i}.log").read_text() for r in runs) for i in range(workers)}
            finally:
                for p in procs:
                    stop_process(p, timeout=10)
    states = sorted({r.state.name for r in runs})
    overhead = [(firsts[r.id] - r.created).total_seconds() for r in runs]
    audit = [(r.end_time - firsts[r.id]).total_seconds() for r in runs]
    span = (max(r.end_time for r in runs) - min(r.created for r in runs)).total_seconds()
    return {"teachers": teachers, "workers": workers, "slots": slots, "states": states, "runs_per_worker": took,
            "submitted": len(tick["submitted"]), "tick_s": round(tick_s, 1), "span_s": round(span, 1),
            "audits_per_hour": round(teachers * 3600 / span, 1),
            "overhead_s": {"mean": round(statistics.mean(overhead), 1), "min": round(min(overhead), 1), "max": round(max(overhead), 1)},
            "audit_s": {"mean": round(statistics.mean(audit), 1), "min": round(min(audit), 1), "max": round(max(audit), 1)}}


def table(r: dict) -> str:
    o, a = r["overhead_s"], r["audit_s"]
    return "\n".join([
        "| teachers | workers | slots | audits/hour | wall (first submission to last end) | scheduling overhead per audit (mean, min-max) | audit (mean, min-max) | runs per worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['teachers']} | {r['workers']} | {r['slots']} | {r['audits_per_hour']} | {r['span_s']} s | "
        f"{o['mean']} s ({o['min']}-{o['max']}) | {a['mean']} s ({a['min']}-{a['max']}) | "
        + ", ".join(f"{k}: {v}" for k, v in r["runs_per_worker"].items()) + " |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=1, help="slots of the accelerator limit")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args()
    r = measure(a.teachers, a.workers, a.slots, a.timeout)
    r["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(table(r))
    if r["states"] != ["Completed"]:
        raise SystemExit(f"not every audit completed: {r['states']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(table(r) + "\n")


if __name__ == "__main__":
    main()
