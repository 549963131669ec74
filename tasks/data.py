"""Versioning the clean data the way DVC does (its md5), for lineage in results, MLflow and the registry."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task


def dvc_md5(path: str | Path) -> str:
    """The hash ``dvc add`` records for a file (``md5`` of its bytes) or a directory (``.dir`` md5),
    computed with DVC's own hashing (``dvc_data``)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5")
        return obj.hash_info.value


@task(name="version-data")
def version_data(source: str, dataset_version: str) -> str:
    """``md5:<dvc md5>`` for a local file or folder; ``<kind>:<content hash>`` for built-in or torchvision data."""
    p = Path(source)
    if source != "synthetic" and not source.startswith("torchvision:") and p.exists():
        return f"md5:{dvc_md5(p)}"
    return f"{source.split(':')[0]}:{dataset_version}"


