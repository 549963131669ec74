"""Storing the student (local directory by default, S3 when the store URI says so)."""

from __future__ import annotations

from prefect import task

from tasks.common import timeout_of


@task(name="store-student", timeout_seconds=timeout_of("store-student"))
def store_student_task(student_file: str, teacher_fingerprint: str, meta: dict, store_uri: str | None, run: str,
                       retries: int | None = None, sse: str | None = None, kms_key_id: str | None = None) -> dict:
    """Verified, atomic upload under ``<sanitized|quarantine>/<teacher fingerprint>/<run>/`` (by the verdict in
    ``meta``; student, then ``meta.json``), S3 server-side encrypted with ``sse`` (``AES256`` / ``aws:kms`` and
    ``kms_key_id``) when given. Retries live in the store's S3 client (one layer), not in this task:
    ``retries`` are the retries after the first attempt."""
    from mimic.errors import StoreError
    from mimic.store import open_store, store_student

    if sse and not (store_uri or "").startswith("s3://"):
        raise StoreError(f"--sse {sse}: server-side encryption needs an s3:// store, not {store_uri or 'runs/store'}")
    opts = {} if retries is None else {"retries": retries + 1}
    if sse:
        opts.update(sse=sse, kms_key_id=kms_key_id)
    store = open_store(store_uri, **opts)
    return {"store": store.uri, "sse": sse, **store_student(store, teacher_fingerprint, student_file, meta, run,
                                                            verdict=meta["verdict"]["verdict"])}
