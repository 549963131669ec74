"""Scheduled audits: watch an incoming location (a directory or an ``s3://`` prefix) for checkpoints.

Each tick lists the candidates, fingerprints them (a file already seen with the same size and
mtime/ETag is not reloaded), and audits every teacher fingerprint not audited before -- exactly
once: the same weights under another name or format are recognised by their fingerprint. The
ledger is a directory of small JSON files, one per fingerprint, claimed atomically, so two
watchers (or a watcher and a CLI audit) never audit one teacher twice. A failed audit releases
its claim (the next tick tries again); a refused file (unsafe or not an encoder) is recorded and
reported once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from prefect import flow, task

from flows.audit import audit_flow
from mimic.config import config_from_dict
from mimic.errors import CheckpointError, MimicError
from mimic.inputs import admit_teacher
from mimic.io import write_json
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


@flow(name="mimic-watch", log_prints=True)
def watch_flow(
    location: str,
    data: str,
    params: dict,
    ledger: str = "runs/watch",
    eval_data: str | None = None,
    store: str | None = None,
    root: str = "runs/cache",
    out_root: str = "runs/audits",
    track: bool = True,
    network_retries: int | None = None,
    progress: bool = False,
) -> dict:
    """One tick: audit every new teacher fingerprint under ``location``; returns what happened."""
    book = Ledger(ledger)
    limits = config_from_dict(params).limits
    known = book.files()
    audited, skipped, refused, failed = [], [], [], []
    for cand in list_incoming(location, network_retries):
        memo = known.get(f"{cand['uri']}|{cand['version']}")
        if memo is not None and memo.get("refused"):
            continue  # reported when first seen
        if memo is not None:
            fp = memo["fingerprint"]
            local = None
        else:
            try:
                local = fetch_teacher(cand["uri"], str(Path(root) / "fetched"), network_retries)
                fp = admit_teacher(local, limits).fingerprint
            except CheckpointError as exc:
                log.warning("%s: refused: %s", cand["name"], exc)
                book.remember(cand["uri"], cand["version"], {"refused": str(exc)})
                refused.append({"uri": cand["uri"], "reason": str(exc)})
                continue
            book.remember(cand["uri"], cand["version"], {"fingerprint": fp})
        if not book.claim(fp, cand["uri"]):
            skipped.append({"uri": cand["uri"], "fingerprint": fp})
            continue
        try:
            res = audit_flow(teacher=cand["uri"], data=data, params=params, out=str(Path(out_root) / fp[:12]),
                             eval_data=eval_data, store=store, root=root, track=track, network_retries=network_retries,
                             progress=progress)
        except Exception as exc:  # noqa: BLE001 - one bad teacher must not stop the tick
            book.release(fp)
            log.error("%s: audit failed: %s", cand["name"], " ".join(str(exc).split()))
            failed.append({"uri": cand["uri"], "fingerprint": fp, "error": " ".join(str(exc).split())})
            continue
        record = {"uri": cand["uri"], "verdict": res["verdict"]["verdict"], "results": str(Path(res["out"]) / "results.json"),
                  **{k: res[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "teacher_pl1", "student_pl1")},
                  "scan": {who: rec["verdict"] for who, rec in res.get("scan", {}).items()}, "asr_trigger": res["trigger"]["source"]}
        book.finish(fp, record)
        audited.append({"fingerprint": fp, **record})
    return {"location": location, "audited": audited, "skipped": skipped, "refused": refused, "failed": failed}
