"""Storing the audited student (local directory by default, S3 when the store URI says so)."""

from __future__ import annotations

from prefect import task

from tasks.common import NETWORK


@task(name="store-student", **NETWORK)
def store_student_task(student_file: str, teacher_fingerprint: str, meta: dict, store_uri: str | None, run: str | None = None) -> dict:
    """Verified, atomic upload under ``<sanitized|quarantine>/<teacher fingerprint>/<run>/`` (by the
    verdict in ``meta``; student, then ``meta.json``)."""
    from mimic.store import open_store, store_student

    store = open_store(store_uri)
    return {"store": store.uri, **store_student(store, teacher_fingerprint, student_file, meta, run,
                                                     verdict=meta["verdict"]["verdict"])}
