"""The watch's ledger: which teacher fingerprints were audited, and which are being audited, by whom.

Layout of ``DIR``:

* ``seen/<fingerprint>.json``: one record per teacher. ``{"status": "audited", ...}`` is final
  (never taken over, never re-audited). ``{"status": "auditing", "owner": {"host", "pid",
  "token"}, "heartbeat": t, "expires": t + lease_s}`` is a *claim*: the owner (one
  :class:`Ledger` object: host name, process id and a random token, so two watchers in one
  process are two owners) audits that teacher now, and refreshes ``heartbeat``/``expires``
  every ``lease_s / 3`` seconds while it does (:meth:`Ledger.holding`).
* ``files.json``: ``"<uri>|<version>" -> {"fingerprint"} | {"refused": reason}``, so a file seen
  before (same size and mtime/ETag) is not reloaded and a refused one is reported once.
* ``ledger.lock``: every read-modify-write of the two above holds this inter-process lock
  (:func:`mimic.cache.locked`, ``filelock``; the kernel releases it if the holder dies), and
  every file is replaced atomically (:func:`mimic.io.write_json`). So two watchers never audit one
  teacher twice and never lose each other's ``files.json`` entries.

A claim is *stale*, and the next :meth:`Ledger.claim` takes it over, when its lease expired
(``now > expires``: its owner stopped refreshing it: killed, hung, or on a host that went away),
when its owner is a process of this host that no longer exists (a watcher killed mid-audit; no
need to wait for the lease), or when it has no owner at all (written by an older mimic, which
kept no heartbeat). ``lease_s = 0`` disables the expiry: only claims of dead local owners are
taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mimic.cache import locked
from mimic.io import read_json, write_json

log = logging.getLogger("mimic")
LOCK_TIMEOUT_S = 60.0    # the ledger lock is only ever held for a few small file operations


def _now() -> float:
    return time.time()  # wall clock: claims are compared across processes (and hosts)


def _pid_alive(pid: object) -> bool:
    """Whether process ``pid`` of this host exists (a non-positive or odd pid counts as alive: unknown)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


class Ledger:
    """The ledger in ``root``; this object is one owner of claims (see the module docstring).
    ``lease_s``: the lease of its claims (the watch passes ``timeouts.claim``)."""

    def __init__(self, root: str | Path, lease_s: float, lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        if lease_s < 0:
            raise ValueError("lease_s must be >= 0 (0 = claims never expire)")
        self.root = Path(root)
        self.lease_s = float(lease_s)
        self.lock_timeout = lock_timeout
        (self.root / "seen").mkdir(parents=True, exist_ok=True)
        self._files_path = self.root / "files.json"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": secrets.token_hex(8)}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with locked(self.root / "ledger.lock", f"the watch ledger {self.root}", self.lock_timeout):
            yield

    def _path(self, fingerprint: str) -> Path:
        return self.root / "seen" / f"{fingerprint}.json"

    # -- files.json --------------------------------------------------------------------------
    def files(self) -> dict[str, dict]:
        try:
            data = read_json(self._files_path)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remember(self, uri: str, version: str, info: dict) -> None:
        with self._locked():
            files = self.files()
            files[f"{uri}|{version}"] = info
            write_json(self._files_path, files)

    # -- claims ------------------------------------------------------------------------------
    def record(self, fingerprint: str) -> dict | None:
        """The record of ``fingerprint`` (None: never seen; ``{"status": "unreadable"}``: not JSON)."""
        try:
            rec = read_json(self._path(fingerprint))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"status": "unreadable"}
        return rec if isinstance(rec, dict) else {"status": "unreadable"}

    def _ours(self, rec: dict | None) -> bool:
        return bool(rec) and rec.get("status") == "auditing" and rec.get("owner") == self.owner

    def stale(self, rec: dict | None) -> str | None:
        """Why the claim ``rec`` may be taken over, or None (no claim, a live one, or a final record)."""
        if not rec or rec.get("status") != "auditing":
            return None
        owner = rec.get("owner")
        if not isinstance(owner, dict):
            return "the claim has no owner or lease (an older mimic)"
        if owner.get("host") == self.owner["host"] and not _pid_alive(owner.get("pid")):
            return f"its owner (pid {owner.get('pid')} on this host) is gone"
        expires = rec.get("expires")
        if isinstance(expires, (int, float)) and _now() > expires:
            return f"its lease expired {_now() - expires:.0f} s ago (no heartbeat from {owner.get('host')!r})"
        return None

    def _claim_record(self, fingerprint: str, uri: str, **extra: object) -> dict:
        now = _now()
        return {"fingerprint": fingerprint, "uri": uri, "status": "auditing", "owner": self.owner,
                "claimed": now, "heartbeat": now, "expires": now + self.lease_s if self.lease_s else None, **extra}

    def claim(self, fingerprint: str, uri: str) -> bool:
        """True if this owner now holds the audit of ``fingerprint``: nobody had it, or a stale claim was taken over."""
        with self._locked():
            rec = self.record(fingerprint)
            why = self.stale(rec)
            if rec is not None and why is None:
                return False
            extra = {"took_over": {"owner": rec.get("owner"), "reason": why}} if why else {}
            write_json(self._path(fingerprint), self._claim_record(fingerprint, uri, **extra))
        if why:
            log.warning("%r: taking over the audit claim on %s: %s", uri, fingerprint[:12], why)
        return True

    def heartbeat(self, fingerprint: str) -> bool:
        """Refresh this owner's claim; False if it is no longer ours (taken over, finished or released)."""
        with self._locked():
            rec = self.record(fingerprint)
            if not self._ours(rec):
                return False
            now = _now()
            write_json(self._path(fingerprint), {**rec, "heartbeat": now, "expires": now + self.lease_s if self.lease_s else None})
        return True

    @contextlib.contextmanager
    def holding(self, fingerprint: str) -> Iterator[None]:
        """Keep this owner's claim on ``fingerprint`` alive for the block (a daemon thread beats every lease/3 s)."""
        if not self.lease_s:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.heartbeat(fingerprint):
                        log.warning("the audit claim on %s was taken over by another watcher", fingerprint[:12])
                        return
                except Exception as exc:  # noqa: BLE001 - a missed beat must not stop the audit; the next one retries
                    log.warning("could not refresh the audit claim on %s: %s", fingerprint[:12], " ".join(str(exc).split()))

        thread = threading.Thread(target=beat, name=f"mimic-claim-{fingerprint[:12]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=self.lock_timeout)

    def finish(self, fingerprint: str, record: dict) -> None:
        """Record the audit as done (final); the first ``audited`` record of a fingerprint is kept."""
        with self._locked():
            cur = self.record(fingerprint)
            if cur is not None and cur.get("status") == "audited":
                return
            write_json(self._path(fingerprint), {"fingerprint": fingerprint, "status": "audited", **record})

    def release(self, fingerprint: str) -> None:
        """Drop this owner's claim (the next tick tries again); another owner's claim is left alone."""
        with self._locked():
            if self._ours(self.record(fingerprint)):
                self._path(fingerprint).unlink(missing_ok=True)

    def seen(self) -> dict[str, dict]:
        out = {}
        for p in sorted((self.root / "seen").glob("*.json")):
            out[p.stem] = self.record(p.stem) or {"status": "unreadable"}
        return out
