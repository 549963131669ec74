"""Scheduled audits: watch an incoming location (a directory or an ``s3://`` prefix) for checkpoints.

Each tick lists the candidates, fingerprints them (a file already seen with the same size and
mtime/ETag is not reloaded), and audits every teacher fingerprint not audited before -- exactly
once: the same weights under another name or format are recognised by their fingerprint. The
ledger is a directory of small JSON files, one per fingerprint, claimed atomically, so two
watchers (or a watcher and a CLI audit) never audit one teacher twice. A failed audit releases
its claim (the next tick tries again); a refused file (unsafe or not an encoder) is recorded and
reported once (a Failed ``admit-teacher`` task and the event ``mimic.audit.refused``).

A tick ends ``Completed`` (its message counts what happened) or ``Failed`` when an audit failed;
each audit is a subflow with its own state (``Completed``, ``Rejected``, ``Failed``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows.audit import audit_flow, results_of
from flows.params import AuditInput, Services, Settings
from mimic.errors import CheckpointError, MimicError
from mimic.inputs import admit_teacher
from mimic.io import write_json
from tasks.observe import emit
from tasks.teacher import fetch_teacher

log = logging.getLogger("mimic")
SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")


@task(name="list-incoming")
def list_incoming(location: str, retries: int | None = None) -> list[dict]:
    """Candidate checkpoints under ``location``: ``[{"uri", "name", "version"}]`` (version = size + mtime/ETag)."""
    if location.startswith("s3://"):
        from mimic.store import open_store

        store = open_store(location) if retries is None else open_store(location, retries=retries + 1)
        return [{"uri": store.url(o["key"]), "name": o["key"], "version": f"{o['size']}:{o.get('etag') or o['modified']}"}
                for o in store.list() if o["key"].lower().endswith(SUFFIXES)]
    root = Path(location)
    if not root.is_dir():
        raise MimicError(f"{location}: not a directory or s3:// prefix to watch")
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."):
            st = p.stat()
            out.append({"uri": str(p), "name": str(p.relative_to(root)), "version": f"{st.st_size}:{st.st_mtime_ns}"})
    return out


class Ledger:
    """``DIR/seen/<fingerprint>.json`` (claimed with O_EXCL), ``DIR/files.json`` (uri+version -> fingerprint)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "seen").mkdir(parents=True, exist_ok=True)
        self._files_path = self.root / "files.json"

    def files(self) -> dict[str, dict]:
        try:
            return json.loads(self._files_path.read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, uri: str, version: str, info: dict) -> None:
        files = self.files()
        files[f"{uri}|{version}"] = info
        write_json(self._files_path, files)

    def claim(self, fingerprint: str, uri: str) -> bool:
        """True if this process now owns the audit of ``fingerprint`` (nobody claimed it before)."""
        path = self.root / "seen" / f"{fingerprint}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"fingerprint": fingerprint, "uri": uri, "status": "auditing", "pid": os.getpid()}, f)
        return True

    def finish(self, fingerprint: str, record: dict) -> None:
        write_json(self.root / "seen" / f"{fingerprint}.json", {"fingerprint": fingerprint, "status": "audited", **record})

    def release(self, fingerprint: str) -> None:
        (self.root / "seen" / f"{fingerprint}.json").unlink(missing_ok=True)

    def seen(self) -> dict[str, dict]:
        out = {}
        for p in sorted((self.root / "seen").glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                out[p.stem] = {"status": "unreadable"}
        return out


@task(name="admit-teacher", cache_policy=NO_CACHE)
def admit_candidate(local: str, limits) -> str:
    """The fingerprint of an incoming file; a refused (unsafe, not an encoder) file fails this task with the reason."""
    return admit_teacher(local, limits).fingerprint


@flow(name="mimic-watch", log_prints=True, validate_parameters=True)
def watch_flow(
    location: str,
    data: str,
    settings: Settings | None = None,
    services: Services | None = None,
    ledger: str = "runs/watch",
    eval_data: str | None = None,
    out_root: str = "runs/audits",
    progress: bool = False,
) -> dict:
    """One tick: audit every new teacher fingerprint under ``location``; returns what happened."""
    logger = get_run_logger()
    settings, services = settings or Settings(), services or Services()
    retries, root = services.network_retries, services.cache
    book = Ledger(ledger)
    limits = settings.config(data).limits
    known = book.files()
    audited, skipped, refused, failed = [], [], [], []
    for cand in list_incoming(location, retries):
        memo = known.get(f"{cand['uri']}|{cand['version']}")
        if memo is not None and memo.get("refused"):
            continue  # reported when first seen
        if memo is not None:
            fp = memo["fingerprint"]
        else:
            local = fetch_teacher(cand["uri"], str(Path(root) / "fetched"), retries)
            state = admit_candidate(local, limits, return_state=True)
            try:
                fp = state.result()
            except CheckpointError as exc:
                logger.warning("%s: refused: %s", cand["name"], exc)
                emit("refused", None, cand["uri"], {"reason": str(exc)})
                book.remember(cand["uri"], cand["version"], {"refused": str(exc)})
                refused.append({"uri": cand["uri"], "reason": str(exc)})
                continue
            book.remember(cand["uri"], cand["version"], {"fingerprint": fp})
        if not book.claim(fp, cand["uri"]):
            skipped.append({"uri": cand["uri"], "fingerprint": fp})
            continue
        try:
            res = results_of(audit_flow(AuditInput(teacher=cand["uri"], data=data, eval_data=eval_data), settings, services,
                                        out=str(Path(out_root) / fp[:12]), progress=progress, return_state=True))
        except Exception as exc:  # noqa: BLE001 - one bad teacher must not stop the tick
            book.release(fp)
            logger.error("%s: audit failed: %s", cand["name"], " ".join(str(exc).split()))
            failed.append({"uri": cand["uri"], "fingerprint": fp, "error": " ".join(str(exc).split())})
            continue
        record = {"uri": cand["uri"], "verdict": res["verdict"]["verdict"], "results": str(Path(res["out"]) / "results.json"),
                  **{k: res[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "teacher_pl1", "student_pl1")},
                  "scan": {who: rec["verdict"] for who, rec in res.get("scan", {}).items()}, "asr_trigger": res["trigger"]["source"]}
        book.finish(fp, record)
        audited.append({"fingerprint": fp, **record})
    tick = {"location": location, "audited": audited, "skipped": skipped, "refused": refused, "failed": failed}
    rejected = sum(a["verdict"] == "rejected" for a in audited)
    summary = (f"{len(audited)} audited ({rejected} rejected), {len(skipped)} already seen, {len(refused)} refused, "
               f"{len(failed)} failed")
    if failed:
        return Failed(message=summary, data=WatchFailed(tick))
    return Completed(message=summary, data=tick)


class WatchFailed(Exception):
    """A tick in which an audit failed; ``tick`` holds what happened."""

    def __init__(self, tick: dict) -> None:
        super().__init__(f"{len(tick['failed'])} audit(s) failed")
        self.tick = tick


def tick_of(state) -> dict:
    """What a watch tick did, from its final state (a failed tick too); raises any other error."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, WatchFailed):
        return data.tick
    if isinstance(data, BaseException):
        raise data
    return data
