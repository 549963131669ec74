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


# --- the attack zoo's small bench: fast, and it really implants a backdoor -------------------
# The `tiny` profile learns almost nothing (probe CA at chance, a 1-epoch attack fails), so the
# attack and defence tests share this instead: 4 synthetic texture classes (400 train / 200 test
# images), a width-4 encoder with 6 epochs of SimCLR (linear-probe CA ~70 %, clean ASR ~10 %), and
# 5-epoch attacks on 200 shadow images (BadEncoder: teacher ASR ~90 %), all in fp32.

ZOO_SETS = (
    "encoder.width=4", "pretrain.epochs=6", "pretrain.lr=0.01", "pretrain.batch_size=64",
    "attack.epochs=5", "attack.batch_size=32", "attack.shadow_size=200", "attack.target_class=0",
    "data.clean_size=160", "evaluate.epochs=30", "evaluate.probe=linear", "evaluate.zscore=false",
    "unlearn.epochs=3", "unlearn.batch_size=32", "prune.epochs=2", "prune.batch_size=32",
    "adaptive.student_warmup_epochs=1",
    "precision=fp32",  # the same bench on every CPU: `auto` is bf16 autocast only where the CPU has AVX512-BF16
)


class ZooBench:
    """The shared bench: config, 4-class dataset, clean encoder, a stage cache, and a probe."""

    def __init__(self, root: Path) -> None:
        from mimic.cache import StageCache
        from mimic.data import Dataset, content_hash
        from mimic.inputs import load_teacher
        from mimic.stages.pretrain import plan_pretrain
        from mimic.synthetic import make_synthetic

        def images(n: int, seed: int) -> ImageSet:
            x, y = make_synthetic(n, seed, 4)
            return ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))

        train, test = images(400, 0), images(200, 1)
        self.ds = Dataset("synthetic-4", train, test, 4, content_hash(train.x, train.y, test.x, test.y))
        self.cfg = load_config(profile="tiny", sets=list(ZOO_SETS))
        self.cache = StageCache(root / "cache")
        self.root = root
        pre = plan_pretrain(self.cfg, self.ds, progress=False).run(self.cache)
        self.clean_path = pre.path("encoder")
        self.clean = load_teacher(self.clean_path)
        self._probed: dict = {}

    def config(self, *sets: str):
        return load_config(profile="tiny", sets=[*ZOO_SETS, *sets])

    def clean_set(self, cfg=None):
        """The defender's clean set D and its content hash."""
        from mimic.inputs import clean_subset, clean_version

        d = clean_subset(cfg or self.cfg, self.ds)
        return d, clean_version(d)

    def probe(self, encoder, trigger, target: int = 0) -> tuple[float, float]:
        """(CA, ASR) % of a linear probe (30 epochs) on the encoder's features (memoised)."""
        from mimic.evaluate import evaluate_encoder
        from mimic.fingerprint import fingerprint_encoder
        from mimic.inputs import trigger_identity

        key = (fingerprint_encoder(encoder), trigger_identity(trigger), target)
        if key not in self._probed:
            r = evaluate_encoder(encoder, self.ds.train, self.ds.test, 4, trigger=trigger, target=target, epochs=30)[0]
            self._probed[key] = (r.ca, r.asr)
        return self._probed[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ZooBench:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ZooBench(tmp_path_factory.mktemp("zoo"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def zoo_teacher(zoo):
    """A BadEncoder teacher of the bench (the white 10x10 patch, target 0) and its stage run."""
    from mimic.inputs import load_teacher
    from mimic.stages.attack import plan_attack

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = plan_attack(zoo.cfg, zoo.clean, zoo.ds, progress=False).run(zoo.cache)
    finally:
        torch.set_num_threads(before)
    return load_teacher(run.path("encoder")), run
