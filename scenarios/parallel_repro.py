"""`dvc repro` with J stage commands at a time: DVC runs one stage after another (its repository lock is
held for the whole repro), which leaves all but one core idle in a matrix of independent cells.

    python scenarios/parallel_repro.py -j 2 scenarios/zoo/dvc.yaml            # everything in that file
    python scenarios/parallel_repro.py -j 2 $(python scenarios/zoo/matrix.py targets --seeds 0)

The targets are what `dvc repro` takes. A stage runs once every stage it depends on has finished, and only
if DVC calls it changed (the same check `dvc repro` makes); its command runs in the stage's folder, and
when it succeeds this process commits it with DVC's own API (`Repo.commit`, under the repository lock, one
at a time), so `dvc.lock` is what `dvc repro` would have written and a later `dvc status` / `dvc repro`
picks up from there. A failed stage skips its dependents, the others go on; the exit status is 1 then.
Stop with Ctrl-C: the running commands are terminated and the stages committed so far stay committed.
Progress goes to stderr; `--json PATH` writes every stage's outcome and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Outcome:
    stage: str
    status: str          # ran | unchanged | failed | skipped (an upstream stage failed)
    seconds: float = 0.0
    returncode: int | None = None


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def plan(repo, targets: list[str]) -> tuple[list[str], dict[str, set[str]]]:
    """The stages the targets need (addressing strings, in a topological order) and each one's upstream."""
    import networkx as nx

    graph = repo.index.graph                     # edges point from a stage to the stages it depends on
    wanted = set()
    for t in targets:
        for stage in repo.stage.collect(t):
            wanted.add(stage)
            wanted |= nx.descendants(graph, stage)
    sub = graph.subgraph(wanted)
    order = [s.addressing for s in reversed(list(nx.topological_sort(sub)))]
    ups = {s.addressing: {d.addressing for d in sub.successors(s)} for s in sub.nodes}
    return order, ups


def _changed(repo, addressing: str) -> bool:
    with repo.lock:
        repo._reset()                            # re-read dvc.lock: earlier commits of this run changed it
        (stage,) = repo.stage.collect(addressing)
        return not stage.frozen and stage.changed()


def _command(repo, addressing: str) -> tuple[str, str]:
    (stage,) = repo.stage.collect(addressing)
    return stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd), stage.wdir


def run(root: Path, targets: list[str], jobs: int, log_dir: Path | None = None) -> list[Outcome]:
    from dvc.repo import Repo

    repo = Repo(str(root))
    order, ups = plan(repo, targets)
    _log(f"{len(order)} stages, {jobs} at a time")
    outcomes: dict[str, Outcome] = {}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    pending = list(order)
    try:
        while pending or running:
            for addressing, (proc, start) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[addressing]
                secs = round(time.monotonic() - start, 1)
                if rc == 0:
                    repo._reset()
                    repo.commit(addressing, force=True)   # takes the repository lock itself
                    outcomes[addressing] = Outcome(addressing, "ran", secs, rc)
                    _log(f"done {addressing} ({secs} s; {len(outcomes)}/{len(order)})")
                else:
                    outcomes[addressing] = Outcome(addressing, "failed", secs, rc)
                    _log(f"FAILED {addressing} (exit {rc} after {secs} s)")
            progressed = False
            for addressing in list(pending):
                if len(running) >= jobs:
                    break
                up = ups[addressing]
                if any(outcomes.get(u) and outcomes[u].status in ("failed", "skipped") for u in up):
                    outcomes[addressing] = Outcome(addressing, "skipped")
                    pending.remove(addressing)
                    progressed = True
                    continue
                if not all(u in outcomes for u in up):
                    continue
                pending.remove(addressing)
                progressed = True
                if not _changed(repo, addressing):
                    outcomes[addressing] = Outcome(addressing, "unchanged")
                    continue
                cmd, wdir = _command(repo, addressing)
                _log(f"run {addressing}")
                out = None
                if log_dir is not None:
                    log_dir.mkdir(parents=True, exist_ok=True)
                    out = open(log_dir / (addressing.replace("/", "_").replace(":", "_") + ".log"), "w")
                proc = subprocess.Popen(cmd, shell=True, cwd=wdir, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        start_new_session=True)
                if out is not None:
                    out.close()
                running[addressing] = (proc, time.monotonic())
            if not progressed:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for addressing, (proc, _) in running.items():
            os.killpg(proc.pid, signal.SIGTERM)
            _log(f"stopped {addressing}")
        for proc, _ in running.values():
            proc.wait()
        raise
    finally:
        repo.close()
    return [outcomes[a] for a in order if a in outcomes]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="+", help="what `dvc repro` takes: dvc.yaml files or stage addresses")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="stage commands at a time")
    ap.add_argument("--logs", type=Path, help="write each stage's output to DIR/<stage>.log (default: the terminal)")
    ap.add_argument("--json", type=Path, help="write the outcome of every stage here")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    from dvc.exceptions import DvcException

    try:
        outcomes = run(Path.cwd(), args.targets, args.jobs, args.logs)
    except KeyboardInterrupt:
        print("interrupted: the stages that finished are committed", file=sys.stderr)
        return 130
    except DvcException as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ran", "unchanged", "failed", "skipped")}
    _log(", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"jobs": args.jobs, "targets": args.targets, "counts": counts,
                                         "stages": [asdict(o) for o in outcomes]}, indent=1) + "\n")
    return 1 if counts["failed"] or counts["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
