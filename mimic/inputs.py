"""What an audit reads, each loaded once: the teacher, the data, the trigger used for ASR.

* :func:`admit_teacher` loads a teacher file safely, once per process (keyed by its content hash,
  so the stages of one audit share one load); :func:`keep_copy` then copies its bytes to a
  content-addressed file (``<dir>/<sha256>.<suffix>``) that every later stage reads, so swapping
  the original path mid-audit cannot poison a cache.
* :func:`load_data` keeps loaded datasets per process, keyed by the source and (for files) their
  size and modification time.
* :func:`clean_subset`, :func:`labelled_train`, :func:`require_clean_size`, :func:`load_trigger`,
  :func:`resolve_attack` are the one place each of these rules lives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimic.checkpoints import LoadedEncoder, Limits, load_encoder
from mimic.config import Config
from mimic.data import Dataset, ImageSet, content_hash, load_dataset, require_size, stratified_indices
from mimic.errors import CheckpointError, DataError
from mimic.fingerprint import fingerprint_encoder
from mimic.io import copy_file
from mimic.triggers import Trigger

log = logging.getLogger("mimic")

_MEMO_SIZE = 4


class _Memo(OrderedDict):
    """A tiny LRU: the last few loaded teachers / datasets of this process."""

    def get_or(self, key: Any, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > _MEMO_SIZE:
            self.popitem(last=False)
        return value


_teachers = _Memo()
_datasets = _Memo()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Teacher:
    """A teacher admitted to an audit: its content-addressed copy, loaded and fingerprinted once."""

    path: Path  # the copy every stage reads
    source: str  # what the user named (path or URI)
    sha256: str  # of the file's bytes
    loaded: LoadedEncoder
    fingerprint: str  # of the weights, architecture and normalisation (mimic.fingerprint)

    def info(self) -> dict[str, Any]:
        ex = self.loaded.extras
        return {"fingerprint": self.fingerprint, "sha256": self.sha256, "arch": self.loaded.spec.name,
                "layout": self.loaded.layout, "path": str(self.path), "source": self.source,
                "has_trigger": "trigger_patch" in ex, "target_class": _target_from(ex)}


def _target_from(extras: dict) -> int | None:
    t = extras.get("target_class")
    return int(t) if t is not None else None


def admit_teacher(source: str | os.PathLike[str], limits: Limits | None = None) -> Teacher:
    """Load a teacher file safely (refusing anything unsafe, within ``limits``), once per process
    (keyed by its content hash)."""
    src = Path(source)
    if not src.is_file():  # missing, a FIFO, a device, a directory: the loader refuses it without reading
        load_encoder(src, limits=limits)
        raise CheckpointError(f"{source}: not a regular file")
    st = src.stat()
    bound = (limits or Limits()).max_file_bytes
    if st.st_size > bound:  # refuse before hashing a huge file
        raise CheckpointError(f"{source}: {st.st_size} bytes exceeds limit max_file_bytes={bound}")
    sha = file_sha256(src)

    def make() -> Teacher:
        loaded = load_encoder(src, limits=limits)
        if loaded.sha256 != sha:  # replaced between hashing and loading: the weights are not those hashed
            raise DataError(f"{source}: the file changed while it was being read; try again")
        return Teacher(src, str(source), sha, loaded, fingerprint_encoder(loaded.encoder))

    return _teachers.get_or((sha, limits or Limits()), make)  # None and the default limits are one key: one load


def keep_copy(teacher: Teacher, copy_dir: str | Path) -> Teacher:
    """The teacher, now read from a content-addressed copy ``copy_dir/<sha256>.<suffix>`` that every later
    stage reads; a file replaced since it was hashed is refused."""
    path = Path(copy_dir) / f"{teacher.sha256}{teacher.path.suffix.lower() or '.bin'}"
    if not path.exists() or file_sha256(path) != teacher.sha256:
        copy_file(teacher.path, path)
        if file_sha256(path) != teacher.sha256:
            path.unlink(missing_ok=True)
            raise DataError(f"{teacher.source}: the file changed while it was being read; try again")
    return dataclasses.replace(teacher, path=path)


def load_teacher(path: str | os.PathLike[str]) -> LoadedEncoder:
    """A model file loaded once per process (keyed by its content hash), for stages that only read it."""
    return admit_teacher(path).loaded


def _data_key(cfg: Config, source: str) -> tuple:
    if source == "synthetic":
        return (source, cfg.data.synthetic_train, cfg.data.synthetic_test, cfg.seed)
    p = Path(source)
    try:
        st = p.stat()
        return (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (source,)


def load_data(cfg: Config, source: str | None = None) -> Dataset:
    """The dataset named by ``source`` (default ``data.source``), loaded once per process."""
    src = source or cfg.data.source

    def make() -> Dataset:
        ds = load_dataset(src, synthetic_train=cfg.data.synthetic_train, synthetic_test=cfg.data.synthetic_test, seed=cfg.seed)
        if ds.skipped:
            log.warning("%s: skipped %d unreadable image(s)", src, ds.skipped)
        return ds

    return _datasets.get_or(_data_key(cfg, src), make)


def clean_subset(cfg: Config, ds: Dataset) -> ImageSet:
    """The defender's clean set D: ``data.clean_size`` stratified images of the training split."""
    n = len(ds.train)
    if n <= cfg.data.clean_size:
        return ds.train
    return ds.train.subset(stratified_indices(n, ds.train.y, cfg.data.clean_size, cfg.seed))


def clean_version(clean: ImageSet) -> str:
    """Content hash of the clean set (the images and labels MI and distillation see)."""
    return content_hash(clean.x, clean.y)


def require_clean_size(cfg: Config, clean: ImageSet, source: str = "clean set") -> None:
    """Distillation needs at least one full batch of clean images (:func:`mimic.data.require_size`)."""
    require_size(clean, max(cfg.distill.batch_size, 2), "clean set",
                 reason=f"fewer than one batch ({cfg.distill.batch_size}) in {source}; add images or lower distill.batch_size")


def labelled_train(cfg: Config, ds: Dataset) -> ImageSet:
    """The labelled images a probe trains on: ``evaluate.train_size`` stratified (0 = all)."""
    size = cfg.evaluate.train_size
    if size <= 0 or size >= len(ds.train):
        return ds.train
    return ds.train.subset(stratified_indices(len(ds.train), ds.train.y, size, cfg.seed + 1))


def trigger_identity(t: Trigger) -> str:
    """Content hash of a trigger: its pattern, mask and placement."""
    return content_hash(t.patch, t.mask) if t.placement == "fixed" else content_hash(t.patch, t.mask, torch.ones(1))


@dataclass(frozen=True)
class Attack:
    """The trigger and target class used to measure ASR, and where they came from."""

    trigger: Trigger | None
    target: int | None
    source: str | None  # "given" (--trigger/--target-class), "teacher" (stored in the file), "inverted" (the scan's), None

    @property
    def known(self) -> bool:
        return self.trigger is not None and self.target is not None

    @property
    def trigger_id(self) -> str | None:
        if self.trigger is None or not self.known:
            return None
        return trigger_identity(self.trigger)

    def identity(self) -> dict[str, Any]:
        return {"trigger_id": self.trigger_id, "target": self.target if self.known else None}


NO_ATTACK = Attack(None, None, None)


def load_trigger(source: str | None, holder: LoadedEncoder | None = None,
                 checkpoints: Limits | None = None) -> tuple[Trigger | None, LoadedEncoder | None]:
    """The one trigger lookup: the trigger NPZ ``source`` if given, else the trigger stored in a checkpoint's
    extras (None when it carries none). That checkpoint is ``holder``, or -- given ``checkpoints``, the limits
    a checkpoint is admitted within (``--trigger NPZ|PT``) -- ``source`` itself when it does not end in
    ``.npz``. Returns the trigger and the checkpoint it was looked up in (None for a trigger file)."""
    if source and (checkpoints is None or source.endswith(".npz")):
        return Trigger.load_npz(source), None
    if source:
        holder = admit_teacher(source, checkpoints).loaded
    return (Trigger.from_extras(holder.extras) if holder is not None else None), holder


def resolve_attack(teacher: LoadedEncoder | None, trigger_path: str | None = None, target: int | None = None,
                   *, checkpoints: Limits | None = None) -> Attack:
    """The ASR trigger + target: from ``--trigger``/``--target-class``, else from the teacher file.
    ``trigger_path`` is a trigger NPZ or, given ``checkpoints``, a checkpoint carrying one (:func:`load_trigger`);
    a target not given is read from the checkpoint the trigger came from, else from the teacher."""
    trigger, holder = load_trigger(trigger_path, teacher, checkpoints)
    given = (bool(trigger_path) and holder is None) or target is not None
    if holder is None:
        holder = teacher
    if target is None and holder is not None:
        target = _target_from(holder.extras)
    if trigger is None or target is None:
        return NO_ATTACK
    return Attack(trigger, int(target), "given" if given else "teacher")
