"""Versioning the clean data (DVC's hash) and identifying it by content."""

from __future__ import annotations

from prefect import task

from mimic.config import config_from_dict
from mimic.workspace import describe_data


@task(name="version-data")
def version_data(source: str, params: dict) -> dict:
    """DVC hash (``md5:...``) of the data source plus mimic's content hashes of the data and clean set."""
    return describe_data(config_from_dict(params), source)
