"""The on-disk stage cache: ``ROOT/<stage>/<key>/`` holds one finished run of a stage.

A run is finished when its manifest ``stage.json`` (written last, atomically) names the key and
every output file it lists exists. Any front (the CLI, ``dvc repro``, the Prefect flow, a test)
that asks for the same stage and key gets the same directory, so a finished stage is reused by
every later caller, whatever output directory that caller wants.

Concurrent runs of one stage and key serialise on ``ROOT/<stage>/<key>.lock`` (``filelock``;
released by the kernel if the holder dies); the waiting ones then find the manifest and reuse the
result instead of recomputing it. Waiting is bounded: past ``lock_timeout`` seconds a
:class:`LockTimeout` names the stage and the lock file. Training checkpoints of a resumable
stage live in ``ROOT/<stage>/runs/<lineage key>/`` so a longer run resumes a shorter one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimic.errors import MimicError
from mimic.io import read_json, write_json

log = logging.getLogger("mimic")

MANIFEST = "stage.json"
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0


class LockTimeout(MimicError):
    """Another process held a stage's lock for longer than the timeout (hung, or a very long run)."""


@contextlib.contextmanager
def locked(path: Path, what: str, timeout: float | None) -> Iterator[None]:
    """Hold the inter-process lock ``path`` for the block; wait at most ``timeout`` seconds (None: forever)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process working on %s", what)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise LockTimeout(f"{what}: still locked by another process after {timeout:g} s ({path}); "
                              "if that process is hung, stop it and run again") from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class Slot:
    """One stage run's directory; ``manifest`` is set when the run is finished (reusable)."""

    stage: str
    key: str
    dir: Path
    manifest: dict[str, Any] | None = None

    def file(self, name: str) -> Path:
        return self.dir / name

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Record the finished run: ``manifest["files"]`` lists its outputs (relative names)."""
        for name in manifest.get("files", {}).values():
            if not (self.dir / name).exists():
                raise FileNotFoundError(f"{self.stage}: output {name} was not written")
        self.manifest = {"stage": self.stage, "key": self.key, **manifest}
        write_json(self.dir / MANIFEST, self.manifest)
        return self.manifest

    def path_of(self, name: str) -> Path:
        """Absolute path of the output registered as ``name`` in the manifest."""
        assert self.manifest is not None
        return self.dir / self.manifest["files"][name]


def finished(directory: Path, key: str | None = None) -> dict[str, Any] | None:
    """The manifest of a finished run in ``directory`` (with ``key``, when given), else None."""
    try:
        manifest = read_json(directory / MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or (key is not None and manifest.get("key") != key):
        return None
    if not all((directory / name).exists() for name in manifest.get("files", {}).values()):
        return None
    return manifest


class StageCache:
    """``ROOT/<stage>/<key>/`` slots, locked while a run is in progress."""

    def __init__(self, root: str | Path, *, lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT) -> None:
        self.root = Path(root)
        self.lock_timeout = lock_timeout

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lineage_dir(self, stage: str, lineage: str) -> Path:
        return self.root / stage / "runs" / lineage

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        return finished(self.dir(stage, key), key)

    @contextlib.contextmanager
    def slot(self, stage: str, key: str, what: str = "") -> Iterator[Slot]:
        """Lock ``stage``/``key`` and yield its slot (``manifest`` set when already finished)."""
        d = self.dir(stage, key)
        with locked(d.with_name(d.name + ".lock"), what or f"{stage} {key}", self.lock_timeout):
            d.mkdir(parents=True, exist_ok=True)
            yield Slot(stage, key, d, finished(d, key))

    @contextlib.contextmanager
    def lineage(self, stage: str, lineage: str, what: str = "") -> Iterator[Path]:
        """Lock and yield the checkpoint directory of a resume lineage."""
        d = self.lineage_dir(stage, lineage)
        with locked(d.with_name(d.name + ".lock"), what or f"{stage} lineage {lineage}", self.lock_timeout):
            d.mkdir(parents=True, exist_ok=True)
            yield d
