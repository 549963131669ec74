"""Typed parameters of the flows: pydantic models, so Prefect's UI shows a form for a deployment run.

* :class:`Teacher` + data: *what* to audit,
* :class:`Settings`: *how* (the same sources as the CLI: a params file, a profile, ``--set`` items),
  turned into the run's frozen :class:`~mimic.config.Config` by :func:`mimic.config.load_config`,
* :class:`Services`: *where* the results go (store, SSE, MLflow on/off, DVC registry and remote).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mimic.config import Config, load_config


class AuditInput(BaseModel):
    """The teacher to audit and the data to audit it with."""

    teacher: str = Field(description="the encoder checkpoint: a path or s3://bucket/key")
    data: str = Field(description="clean images: synthetic, PATH.npz, an image folder, torchvision:NAME:ROOT")
    eval_data: str | None = Field(None, description="labelled downstream data for CA/ASR (default: data)")
    trigger: str | None = Field(None, description="trigger NPZ to measure ASR with (default: the one in the teacher file)")
    target_class: int | None = Field(None, description="the attack's target class, to measure ASR")


class Settings(BaseModel):
    """The run's parameters: params file <- profile <- data source <- overrides (as ``mimic ... --set``)."""

    params_file: str | None = Field(None, description="params.yaml to read (default: the package defaults)")
    profile: str | None = Field(None, description="a named profile: tiny, demo-data, gpu, ...")
    overrides: list[str] = Field(default_factory=list, description="STAGE.KEY=VALUE items, e.g. distill.epochs=40")

    def config(self, data: str | None = None) -> Config:
        """The frozen configuration (``data`` recorded as ``data.source``, as the CLI does)."""
        extra = {"data": {"source": data}} if data else None
        return load_config(self.params_file, self.profile, list(self.overrides), extra)


class Services(BaseModel):
    """Where an audit's results go."""

    store: str | None = Field(None, description="students: a directory or s3://bucket/prefix (default: runs/store)")
    sse: Literal["AES256", "aws:kms"] | None = Field(None, description="S3 server-side encryption of stored students")
    kms_key_id: str | None = Field(None, description="KMS key id for sse=aws:kms (default: the bucket's AWS-managed key)")
    cache: str = Field("runs/cache", description="the stage cache directory")
    track: bool = Field(True, description="log to MLflow and gate the registry")
    dvc_registry: str = Field("runs/dvc", description="DVC repository the inputs are added to")
    dvc_remote: str | None = Field(None, description="DVC remote URL to push the inputs to (default: the registry's own)")
    network_retries: int | None = Field(None, ge=0, description="retries of the S3 and MLflow steps (default 3)")
    accelerator_limit: str | None = Field(
        None, description="a Prefect global concurrency limit (e.g. mimic-accelerator, slots = the accelerators of a "
        "machine) whose slot every computing stage holds while it computes: training, MI, scan, evaluation. Cached "
        "stages and I/O hold none. It must exist (prefect gcl create NAME --limit N); unset: no limit")
