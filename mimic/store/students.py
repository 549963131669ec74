"""Where audited students go: ``sanitized/`` when the gate passed them, ``quarantine/`` when not."""

from __future__ import annotations

import re
from pathlib import Path

from mimic.errors import StoreError
from mimic.store.base import Source, Store, digest

AREAS = {"sanitized": "sanitized", "rejected": "quarantine"}  # verdict -> top-level prefix
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise StoreError(f"invalid {what} {value!r} (letters, digits, '.', '_', '-')")
    return value


def store_student(store: Store, teacher_fingerprint: str, student_path: str | Path, meta: dict, run: str, *,
                  verdict: str) -> dict:
    """Store an audited student under ``<area>/<teacher fingerprint>/<run>/`` and its ``meta.json`` last.

    ``verdict`` is the gate's label: ``"sanitized"`` puts the student under ``sanitized/``,
    ``"rejected"`` under ``quarantine/`` (a rejected student is never where sanitized ones are
    looked for). ``run`` (the audit key) separates audits of one teacher with other params.

    ``meta.json`` (``meta`` plus ``sha256``, ``size``, ``teacher_fingerprint``, ``run``,
    ``area``, ``student_uri``, ``student_version_id``) is written only after the student is stored
    and verified, so its presence means the upload is complete. When a different student replaces
    an earlier one, the old ``meta.json`` is deleted first, so a ``meta.json`` never describes a
    student that is not the stored one.

    Returns ``{"area", "student_uri", "meta_uri", "sha256", "size", "uploaded", "version_id",
    "meta_version_id"}``; the version ids are the S3 VersionIds on a versioned bucket, else None.
    """
    if verdict not in AREAS:
        raise StoreError(f"invalid verdict {verdict!r} (one of {', '.join(AREAS)})")
    _check_name("teacher fingerprint", teacher_fingerprint)
    _check_name("run name", run)
    src = Source.file(student_path)
    area = AREAS[verdict]
    base = f"{area}/{teacher_fingerprint}/{run}"
    student_key, meta_key = f"{base}/student{src.path.suffix if src.path else ''}", f"{base}/meta.json"
    stored = store.sha256(student_key)
    if stored is not None and stored != digest(src).sha256:
        store.delete(meta_key)
    put = store.put_file(student_path, student_key)
    record = {**meta, "sha256": put["sha256"], "size": put["size"], "teacher_fingerprint": teacher_fingerprint,
              "run": run, "area": area, "student_uri": put["uri"], "student_version_id": put["version_id"]}
    written = store.put_json(record, meta_key)
    return {"area": area, "student_uri": put["uri"], "meta_uri": written["uri"], "sha256": put["sha256"],
            "size": put["size"], "uploaded": put["uploaded"], "version_id": put["version_id"],
            "meta_version_id": written["version_id"]}
