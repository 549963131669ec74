"""Fetching the teacher (a local path, or a verified download of an ``s3://`` object)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.common import timeout_of


@task(name="fetch-teacher", timeout_seconds=timeout_of("fetch-teacher"))
def fetch_teacher(uri: str, cache_dir: str, retries: int | None = None) -> str:
    """A local path for the teacher: itself, or a verified download of the S3 object (cached by ETag).
    Retries live in the S3 client (one layer), not here: ``retries`` after the first attempt."""
    from mimic.store import fetch

    return str(fetch(uri, Path(cache_dir)) if retries is None else fetch(uri, Path(cache_dir), retries=retries + 1))
