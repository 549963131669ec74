"""Storing the student (local directory by default, S3 when the store URI says so)."""

from __future__ import annotations

from prefect import task


@task(name="store-student")
def store_student_task(student_file: str, teacher_fingerprint: str, meta: dict, store_uri: str | None, run: str,
                       retries: int | None = None) -> dict:
    """Verified, atomic upload under ``<sanitized|quarantine>/<teacher fingerprint>/<run>/`` (by the verdict in
    ``meta``; student, then ``meta.json``). Retries live in the store's S3 client (one layer), not in this task:
    ``retries`` are the retries after the first attempt."""
    from mimic.store import open_store, store_student

    store = open_store(store_uri) if retries is None else open_store(store_uri, retries=retries + 1)
    return {"store": store.uri, **store_student(store, teacher_fingerprint, student_file, meta, run,
                                                verdict=meta["verdict"]["verdict"])}
