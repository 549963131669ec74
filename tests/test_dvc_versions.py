"""DVC versioning of an audit's inputs: added to a DVC cache through DVC's API, pushed to an S3 remote
(the loopback moto server), and fetched back by version from the remote alone."""

from __future__ import annotations

import hashlib
import shutil

import boto3

from conftest import write_npz
from tasks.data import dvc_md5, version_inputs


def test_inputs_are_added_pushed_and_fetched_back_by_version(tmp_path, s3_env):
    import dvc.api

    clean = write_npz(tmp_path / "clean.npz", n_train=40, n_test=20)
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.png").write_bytes(b"\x89PNG not really")
    registry, remote = tmp_path / "registry", f"s3://{s3_env}/dvc"
    got = version_inputs.fn({"data": str(clean), "eval_data": str(folder), "teacher": None}, {"data": "v"}, str(registry),
                            remote)
    md5 = hashlib.md5(clean.read_bytes()).hexdigest()
    assert got["data"]["md5"] == md5 == dvc_md5(clean) and got["data_version"] == f"md5:{md5}"
    assert got["eval_data"]["md5"].endswith(".dir") and got["teacher"] is None
    assert got["data"]["pushed"] and got["data"]["remote"] == remote and got["data"]["path"] == f"data/{md5}/clean.npz"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_env, Prefix="dvc/")["Contents"]}
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in keys

    # the same content again: nothing new is added
    again = version_inputs.fn({"data": str(clean)}, {}, str(registry), remote)
    assert again["data"]["md5"] == md5

    # only the .dvc files and the remote left: DVC fetches the version back, byte for byte
    shutil.rmtree(registry / ".dvc" / "cache")
    (registry / got["data"]["path"]).unlink()
    with dvc.api.open(got["data"]["path"], repo=str(registry), remote="mimic", mode="rb") as f:
        assert f.read() == clean.read_bytes()
    with dvc.api.open(f"{got['eval_data']['path']}/cat/a.png", repo=str(registry), remote="mimic", mode="rb") as f:
        assert f.read() == b"\x89PNG not really"


def test_generated_data_is_versioned_by_content_hash_without_dvc(tmp_path):
    got = version_inputs.fn({"data": "synthetic", "teacher": None}, {"data": "abc123"}, str(tmp_path / "registry"))
    assert got == {"data": None, "teacher": None, "data_version": "synthetic:abc123"}
    assert not (tmp_path / "registry").exists()  # nothing to add: no registry is made


def test_the_mlflow_dataset_digest_is_the_dvc_md5(tmp_path):
    """The audit run's dataset inputs carry DVC's md5 (so `dvc get` / `dvc.api.open` finds that version);
    data DVC does not version (generated) carries its content hash instead."""
    from tasks.tracking import _dataset

    clean = write_npz(tmp_path / "clean.npz", n_train=40, n_test=20)
    md5 = dvc_md5(clean)
    ent = _dataset(str(clean), md5, "content-hash-of-the-images", "clean")
    assert ent.digest == md5 and ent.name == "clean" and str(clean) in ent.source
    gen = _dataset("synthetic", None, "abc123", "clean")
    assert gen.digest == "abc123"
