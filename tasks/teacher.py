"""Fetching and fingerprinting the teacher (a local path or an ``s3://`` URI)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mimic.workspace import attack_identity, describe_teacher
from tasks.common import NETWORK


@task(name="fetch-teacher", **NETWORK)
def fetch_teacher(uri: str, cache_dir: str) -> str:
    """A local path for the teacher: itself, or a verified download of the S3 object (cached by ETag)."""
    from mimic.store import fetch

    return str(fetch(uri, Path(cache_dir)))


@task(name="fingerprint-teacher")
def fingerprint_teacher(path: str, trigger: str | None = None, target: int | None = None) -> dict:
    """Safe load (refusing pickled code, lying headers, NaN weights...), the content fingerprint, and
    the identity of the trigger/target used to measure ASR (from the arguments or the teacher file)."""
    return {**describe_teacher(path), **attack_identity(path, trigger, target)}
