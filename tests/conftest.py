"""Shared fixtures: tiny encoders and datasets so the fast suite stays fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mimic.config import load_config
from mimic.data import ImageSet
from mimic.encoders import Encoder, EncoderSpec, build_encoder

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own directory: default outputs (runs/cache, runs/audits, mlflow.db) never
    land in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded (and do not thrash a shared CI box); use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_spec() -> EncoderSpec:
    return EncoderSpec(arch="cifar_resnet18", width=4)


@pytest.fixture
def tiny_encoder(tiny_spec: EncoderSpec) -> Encoder:
    torch.manual_seed(0)
    return build_encoder(tiny_spec).eval()


@pytest.fixture
def tiny_images() -> ImageSet:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 4
    return ImageSet(x, y)


@pytest.fixture
def tiny_config():
    return load_config(profile="tiny")


def write_npz(path: Path, n_train: int = 200, n_test: int = 100, classes: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        y_train=(np.arange(n_train) % classes).astype(np.int64),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        y_test=(np.arange(n_test) % classes).astype(np.int64),
    )
    return path


# --- loopback services (tests/services.py): a real moto S3 server, a fault-injecting proxy ---


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL (http://127.0.0.1:PORT) of a moto S3 server shared by the session; buckets isolate tests."""
    from services import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture
def s3_env(monkeypatch, s3_endpoint, tmp_path_factory) -> str:
    """Point boto3 at the moto server through its standard env vars; create and return a fresh bucket.

    ~/.aws and instance metadata are shut out, so only these settings count.
    """
    import os
    import uuid

    import boto3

    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    empty = tmp_path_factory.mktemp("aws") / "empty"  # a regular empty file: dvc-s3 refuses /dev/null
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def fault_proxy(s3_endpoint):
    """A FaultProxy (tests/services.py) in front of the moto server; point clients at ``proxy.url``."""
    from services import FaultProxy

    with FaultProxy(s3_endpoint) as proxy:
        yield proxy


# --- the pipeline fronts (Prefect flows, MLflow): isolated per test, real local services ---


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness: a temporary database and API, and task results (the cache records)
    in a session directory, so no cache survives from an earlier session."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def pipeline_env(prefect_harness, tmp_path, monkeypatch) -> Path:
    """Run in ``tmp_path`` with a local MLflow store there (``sqlite:///.../mlflow.db``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("MIMIC_STORE", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory) -> Path:
    """A randomly initialised width-4 encoder saved as a checkpoint: a teacher for tests that only
    need the pipeline to run, not a meaningful backdoor."""
    from mimic.checkpoints import save_encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random-teacher") / "teacher.pt"
    save_encoder(path, Encoder(EncoderSpec(width=4)).eval())
    return path


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """A clean tiny SimCLR encoder and a BadEncoder teacher made from it (profile tiny, synthetic data)."""
    from mimic.cache import StageCache
    from mimic.inputs import load_data, load_teacher
    from mimic.io import copy_file
    from mimic.stages.attack import plan_attack
    from mimic.stages.pretrain import plan_pretrain

    root = tmp_path_factory.mktemp("teachers")
    cfg = load_config(profile="tiny")
    ds, cache = load_data(cfg), StageCache(root / "cache")
    pre = plan_pretrain(cfg, ds, progress=False).run(cache)
    att = plan_attack(cfg, load_teacher(pre.path("encoder")), ds, progress=False).run(cache)
    copy_file(pre.path("encoder"), root / "clean.pt")
    copy_file(att.path("encoder"), root / "teacher.pt")
    return {"clean": root / "clean.pt", "teacher": root / "teacher.pt"}
