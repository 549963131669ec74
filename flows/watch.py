"""Scheduled audits: watch an incoming location (a directory or an ``s3://`` prefix) for checkpoints.

Each tick lists the candidates, fingerprints them (a file already seen with the same size and
mtime/ETag is not reloaded), and audits every teacher fingerprint not audited before -- exactly
once: the same weights under another name or format are recognised by their fingerprint. The
:class:`~flows.ledger.Ledger` records, per fingerprint, who audits it (a claim with an owner and a
lease the owner keeps refreshing while it audits) or that it was audited; so two watchers (or a
watcher and a CLI audit) never audit one teacher twice, and a claim left by a killed watcher is
taken over on a later tick (its owner process is gone, or its lease ``timeouts.claim`` expired).
A failed or interrupted audit releases its claim (the next tick tries again); a refused file
(unsafe, not an encoder, an odd name, a symlink out of the watched folder) is recorded and
reported once (a Failed ``admit-teacher`` task or a warning, and the event ``mimic.audit.refused``).

The watch never feeds on itself: the store, ``out_root``, the ledger and the stage cache, when
they lie inside the watched location, are excluded from the listing (a student is never taken for
a new teacher); watching a location inside one of them is refused. Names are printed with control
characters escaped (:func:`mimic.checkpoints.messages.printable`), so a newline in a file name
cannot forge lines of ``mimic watch`` output or of the logs; refusals name the file and the
reason, never its content.

A tick ends ``Completed`` (its message counts what happened) or ``Failed`` when an audit failed;
each audit is a subflow with its own state (``Completed``, ``Rejected``, ``Failed``).

**Many machines** (``deployment``, e.g. ``mimic-audit/audit``): the tick audits nothing itself.
Each new teacher fingerprint becomes a run of the audit deployment on its work pool,
``run_deployment(..., idempotency_key=<submission key>, timeout=0)``, and the tick returns at once;
any number of Prefect workers on any number of machines pull the runs. The submission key hashes
the teacher fingerprint, the clean and evaluation data's content versions and the whole run
configuration, so the Prefect API creates one run per audit however many watchers (or ticks) see
the teacher under however many names: the API's idempotency is the claim, no local lock or ledger
is involved in correctness. A later tick that finds the run *crashed* (its worker or machine died)
schedules it again, up to ``resubmit_limit`` runs; a failed or rejected audit is final (Prefect's
own flow retries handle transient errors inside it). The local ledger then only remembers which
file had which fingerprint (a cache: losing it costs one re-fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed, Scheduled

from flows.audit import audit_flow, payload_of, results_of
from flows.ledger import Ledger
from flows.params import AuditInput, Services, Settings
from mimic.checkpoints.messages import printable
from mimic.errors import CheckpointError, ConfigError, MimicError
from mimic.inputs import admit_teacher
from mimic.store import DEFAULT_ROOT, open_store, parse_s3_uri
from tasks.common import timeout_of
from tasks.observe import emit
from tasks.teacher import fetch_teacher

__all__ = ["Ledger", "WatchFailed", "excluded_prefixes", "list_incoming", "outputs_of", "shown", "tick_of", "watch_flow"]
log = logging.getLogger("mimic")
SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")


def excluded_prefixes(location: str, outputs: dict[str, str | None]) -> list[str]:
    """Key prefixes (relative to ``location``) of mimic's own outputs nested in the watched location.

    ``outputs`` names the store, ``--out-root``, the ledger and the stage cache (a local path or an
    ``s3://`` URI; None is skipped). One nested in the watched location is *excluded* from the
    listing (so a sanitized student, a cached file or a fetched teacher never becomes a new
    teacher); a watched location inside (or equal to) one of them is refused with a ConfigError.
    """
    out = []
    for what, where in outputs.items():
        if not where:
            continue
        if location.startswith("s3://") or where.startswith("s3://"):
            if not (location.startswith("s3://") and where.startswith("s3://")):
                continue  # one local, one remote: they cannot overlap
            (wb, wp), (ob, op) = parse_s3_uri(location), parse_s3_uri(where)
            if wb != ob:
                continue
            watched, nested = (wp.strip("/") + "/").lstrip("/"), (op.strip("/") + "/").lstrip("/")
        else:
            watched, nested = os.path.realpath(location).rstrip("/") + "/", os.path.realpath(where).rstrip("/") + "/"
        if watched.startswith(nested):
            raise ConfigError(f"cannot watch {printable(location, 4096)}: it lies inside the {what} "
                              f"{printable(where, 4096)}, so mimic would audit its own outputs")
        if nested.startswith(watched):
            out.append(nested[len(watched):])
    return out


@task(name="list-incoming", timeout_seconds=timeout_of("list-incoming"))
def list_incoming(location: str, retries: int | None = None, exclude: list[str] | tuple[str, ...] = ()) -> list[dict]:
    """Candidate checkpoints under ``location``: ``[{"uri", "name", "version"}]`` (version = size + mtime/ETag).

    The listing is the store's (:meth:`mimic.store.Store.scan`), which judges each key on its own:
    a key that is odd (a control character such as a newline, ``..``, ``//``, a backslash, mimic's
    temporary prefix), a symlink leading out of the watched folder (never followed, never read)
    or a symlinked folder comes back as ``{"uri", "name", "skipped": reason}`` (checkpoint names
    and folders only), so the tick reports it once and goes on. Hidden files, other suffixes and
    keys under ``exclude`` (prefixes from :func:`excluded_prefixes`) are left out silently.
    """
    if location.startswith("s3://"):
        store = open_store(location) if retries is None else open_store(location, retries=retries + 1)
    else:
        if not Path(location).is_dir():
            raise MimicError(f"{printable(location, 4096)}: not a directory or s3:// prefix to watch")
        store = open_store(location)
    listing = store.scan()
    base = store.uri.rstrip("/")
    out = []
    for o in listing.objects:
        key = o["key"]
        if not any(key.startswith(p) for p in exclude) and _wanted(key):
            out.append({"uri": store.url(key), "name": key, "version": f"{o['size']}:{o.get('etag') or o['modified']}"})
    for s in listing.skipped:
        if not any(s.key.startswith(p) for p in exclude) and (s.key.endswith("/") or _wanted(s.key)):
            out.append({"uri": f"{base}/{s.key}", "name": s.key, "skipped": s.reason})
    return out


def _wanted(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.lower().endswith(SUFFIXES)


def shown(text: str) -> str:
    """``text`` for one line of output or log: control characters (a newline in a file name) escaped."""
    return printable(text, 1 << 16)


def outputs_of(services: Services, ledger: str, out_root: str) -> dict[str, str | None]:
    """mimic's own outputs of a watch (for :func:`excluded_prefixes`): store, out-root, ledger, cache."""
    store = services.store or DEFAULT_ROOT
    store = store if store.startswith("s3://") else open_store(store).uri  # a path or file:// URI
    return {"store": store, "out-root": out_root, "ledger": ledger, "cache": services.cache}


@task(name="admit-teacher", cache_policy=NO_CACHE, timeout_seconds=timeout_of("admit-teacher"))
def admit_candidate(local: str, limits) -> str:
    """The fingerprint of an incoming file; a refused (unsafe, not an encoder) file fails this task with the reason."""
    return admit_teacher(local, limits).fingerprint


def submission_key(fingerprint: str, config: dict, data_versions: dict[str, str | None]) -> str:
    """The Prefect idempotency key of one audit: teacher fingerprint + data content versions + run config."""
    blob = json.dumps(["mimic-audit", fingerprint, data_versions, config], sort_keys=True, default=str)
    return "mimic-audit-" + hashlib.sha256(blob.encode()).hexdigest()[:40]


@task(name="submit-audit", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      timeout_seconds=timeout_of("submit-audit"))
def submit_audit(deployment: str, parameters: dict, key: str, resubmit_limit: int) -> dict:
    """One run of the audit ``deployment`` for ``key`` (created once by the API however often this is
    called); a crashed one is scheduled again while it has run fewer than ``resubmit_limit`` times."""
    from prefect import get_client

    run = run_deployment(deployment, parameters=parameters, idempotency_key=key, timeout=0, as_subflow=False)
    state = run.state
    out = {"flow_run": str(run.id), "state": state.name if state else None, "resubmitted": False}
    if state is not None and state.type == StateType.CRASHED and run.run_count < resubmit_limit:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Scheduled(message=f"resubmitted by the watch after: {state.message}"),
                                      force=True)
        out.update(state="Scheduled", resubmitted=True)
    return out


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
    deployment: str | None = None,
    resubmit_limit: int = 3,
) -> dict:
    """One tick: audit every new teacher fingerprint under ``location`` (in this process, or as runs
    of ``deployment`` on its work pool); returns what happened."""
    logger = get_run_logger()
    settings, services = settings or Settings(), services or Services()
    retries, root = services.network_retries, services.cache
    cfg = settings.config(data)
    book = Ledger(ledger, lease_s=cfg.timeouts.claim)
    limits = cfg.limits
    known = book.files()
    audited, skipped, refused, failed, submitted = [], [], [], [], []
    versions: dict[str, str | None] = {}

    def data_versions() -> dict[str, str | None]:
        if not versions:  # once per tick, and only when there is something to submit
            from mimic.inputs import load_data

            versions["data"] = load_data(cfg).version
            versions["eval_data"] = load_data(settings.config(eval_data)).version if eval_data not in (None, data) else None
        return versions

    def refuse(cand: dict, version: str, reason: str) -> None:
        reason = " ".join(reason.split())
        logger.warning("%s: refused: %s", shown(cand["name"]), shown(reason))
        emit("refused", None, cand["uri"], {"reason": reason})
        book.remember(cand["uri"], version, {"refused": reason})
        refused.append({"uri": cand["uri"], "reason": reason})

    exclude = excluded_prefixes(location, outputs_of(services, ledger, out_root))
    for cand in list_incoming(location, retries, exclude):
        version = "skipped" if "skipped" in cand else cand["version"]
        memo = known.get(f"{cand['uri']}|{version}")
        if memo is not None and memo.get("refused"):
            continue  # reported when first seen
        if "skipped" in cand:
            refuse(cand, version, cand["skipped"])
            continue
        if memo is not None:
            fp = memo["fingerprint"]
        else:
            local = fetch_teacher(cand["uri"], str(Path(root) / "fetched"), retries)
            state = admit_candidate(local, limits, return_state=True)
            try:
                fp = state.result()
            except CheckpointError as exc:
                refuse(cand, version, str(exc))
                continue
            book.remember(cand["uri"], version, {"fingerprint": fp})
        if deployment:
            params = {"audit": AuditInput(teacher=cand["uri"], data=data, eval_data=eval_data).model_dump(),
                      "settings": settings.model_dump(), "services": services.model_dump(),
                      "out": str(Path(out_root) / fp[:12]), "progress": False}
            key = submission_key(fp, cfg.to_dict(), data_versions())
            try:
                sub = submit_audit(deployment, params, key, resubmit_limit)
            except Exception as exc:  # noqa: BLE001 - the API refused it; the next tick submits it again
                error = " ".join(str(exc).split())
                logger.error("%s: submission failed: %s", shown(cand["name"]), shown(error))
                failed.append({"uri": cand["uri"], "fingerprint": fp, "error": error})
                continue
            submitted.append({"uri": cand["uri"], "fingerprint": fp, "key": key, **sub})
            continue
        if not book.claim(fp, cand["uri"]):
            skipped.append({"uri": cand["uri"], "fingerprint": fp})
            continue
        try:
            with book.holding(fp):
                res = results_of(audit_flow(AuditInput(teacher=cand["uri"], data=data, eval_data=eval_data), settings,
                                            services, out=str(Path(out_root) / fp[:12]), progress=progress, return_state=True))
        except Exception as exc:  # noqa: BLE001 - one bad teacher must not stop the tick
            book.release(fp)
            error = " ".join(str(exc).split())
            logger.error("%s: audit failed: %s", shown(cand["name"]), shown(error))
            failed.append({"uri": cand["uri"], "fingerprint": fp, "error": error})
            continue
        except BaseException:  # Ctrl-C, SystemExit: the claim goes now, not when its lease runs out
            book.release(fp)
            raise
        record = {"uri": cand["uri"], "verdict": res["verdict"]["verdict"], "results": str(Path(res["out"]) / "results.json"),
                  **{k: res[k] for k in ("teacher_ca", "teacher_asr", "student_ca", "student_asr", "teacher_pl1", "student_pl1")},
                  "scan": {who: rec["verdict"] for who, rec in res.get("scan", {}).items()}, "asr_trigger": res["trigger"]["source"]}
        book.finish(fp, record)
        audited.append({"fingerprint": fp, **record})
    tick = {"location": location, "audited": audited, "skipped": skipped, "refused": refused, "failed": failed,
            "submitted": submitted}
    rejected = sum(a["verdict"] == "rejected" for a in audited)
    summary = (f"{len(audited)} audited ({rejected} rejected), {len(skipped)} already seen, {len(refused)} refused, "
               f"{len(failed)} failed")
    if deployment:
        runs = {s["flow_run"] for s in submitted}
        summary += (f", {len(submitted)} submitted to {deployment} ({len(runs)} runs, "
                    f"{sum(s['resubmitted'] for s in submitted)} resubmitted after a crash)")
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
    return payload_of(state, WatchFailed, "tick")
