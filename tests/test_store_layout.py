"""S3 the way platform teams expect it (issue 15, point 4), against the loopback moto server:
sanitized/ and quarantine/ prefixes, object versions recorded, server-side encryption applied to
every PUT and verified, SHA-256 checksums kept."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from mimic.errors import StoreError
from mimic.store import open_store, store_student

MIB = 1 << 20


def _raw(endpoint: str, service: str = "s3"):
    import boto3

    return boto3.client(service, endpoint_url=endpoint)


def _write(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(hashlib.shake_256(f"{seed}".encode()).digest(size))
    return path


def _b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
def versioned(s3_env, s3_endpoint) -> str:
    _raw(s3_endpoint).put_bucket_versioning(Bucket=s3_env, VersioningConfiguration={"Status": "Enabled"})
    return s3_env


def test_passing_and_rejected_students_go_to_their_own_prefixes(s3_env, s3_endpoint, tmp_path):
    store = open_store(f"s3://{s3_env}/mimic")
    good = _write(tmp_path / "good.safetensors", 20_000, seed=1)
    bad = _write(tmp_path / "bad.safetensors", 20_000, seed=2)
    passed = store_student(store, "fpA", good, {"student_asr": 1.0}, "run1", verdict="sanitized")
    rejected = store_student(store, "fpA", bad, {"student_asr": 80.0}, "run2", verdict="rejected")
    assert passed["student_uri"] == f"s3://{s3_env}/mimic/sanitized/fpA/run1/student.safetensors"
    assert rejected["student_uri"] == f"s3://{s3_env}/mimic/quarantine/fpA/run2/student.safetensors"
    raw = _raw(s3_endpoint)
    keys = sorted(o["Key"] for o in raw.list_objects_v2(Bucket=s3_env)["Contents"])
    assert keys == ["mimic/quarantine/fpA/run2/meta.json", "mimic/quarantine/fpA/run2/student.safetensors",
                    "mimic/sanitized/fpA/run1/meta.json", "mimic/sanitized/fpA/run1/student.safetensors"]
    assert [o["key"] for o in store.list("sanitized/")] == ["sanitized/fpA/run1/meta.json",
                                                            "sanitized/fpA/run1/student.safetensors"]
    for area, src, r in (("sanitized", good, passed), ("quarantine", bad, rejected)):
        key = f"mimic/{area}/fpA/{r['student_uri'].split('/')[-2]}/student.safetensors"
        head = raw.head_object(Bucket=s3_env, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == _b64sha(src.read_bytes())
        assert head["Metadata"]["sha256"] == r["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        meta_key = key.replace("student.safetensors", "meta.json")
        meta = json.loads(raw.get_object(Bucket=s3_env, Key=meta_key)["Body"].read())
        assert meta["area"] == area and meta["sha256"] == r["sha256"]
    assert passed["version_id"] is None and rejected["meta_version_id"] is None  # the bucket is not versioned


def test_versioned_bucket_records_the_version_ids(versioned, s3_endpoint, tmp_path):
    store = open_store(f"s3://{versioned}")
    raw = _raw(s3_endpoint)
    student = _write(tmp_path / "s.safetensors", 10_000, seed=1)
    r1 = store_student(store, "fp", student, {}, "run", verdict="sanitized")
    key = "sanitized/fp/run/student.safetensors"
    assert r1["version_id"] == raw.head_object(Bucket=versioned, Key=key)["VersionId"]
    assert r1["meta_version_id"] == raw.head_object(Bucket=versioned, Key="sanitized/fp/run/meta.json")["VersionId"]
    meta = json.loads(raw.get_object(Bucket=versioned, Key="sanitized/fp/run/meta.json")["Body"].read())
    assert meta["student_version_id"] == r1["version_id"]

    again = store_student(store, "fp", student, {}, "run", verdict="sanitized")
    assert again["uploaded"] is False and again["version_id"] == r1["version_id"]
    _write(student, 10_000, seed=2)
    r2 = store_student(store, "fp", student, {}, "run", verdict="sanitized")
    assert r2["uploaded"] and r2["version_id"] not in (None, r1["version_id"])
    versions = raw.list_object_versions(Bucket=versioned, Prefix=key)["Versions"]
    assert {v["VersionId"] for v in versions} == {r1["version_id"], r2["version_id"]}
    # the first version is still there, byte for byte
    old = raw.get_object(Bucket=versioned, Key=key, VersionId=r1["version_id"])["Body"].read()
    assert hashlib.sha256(old).hexdigest() == r1["sha256"]
    assert store.get_file(key, tmp_path / "back").read_bytes() == student.read_bytes()


def test_multipart_upload_on_a_versioned_bucket(versioned, s3_endpoint, tmp_path):
    store = open_store(f"s3://{versioned}", multipart_threshold=5 * MIB, part_size=5 * MIB)
    src = _write(tmp_path / "big.bin", 5 * MIB + 1000)
    put = store.put_file(src, "big.bin")
    head = _raw(s3_endpoint).head_object(Bucket=versioned, Key="big.bin")
    assert put["version_id"] == head["VersionId"] and head["ETag"].strip('"').endswith("-2")
    assert store.get_file("big.bin", tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_sse_aes256_on_every_put(s3_env, s3_endpoint, tmp_path):
    store = open_store(f"s3://{s3_env}/enc", sse="AES256")
    student = _write(tmp_path / "s.safetensors", 10_000)
    r = store_student(store, "fp", student, {}, "run", verdict="rejected")
    raw = _raw(s3_endpoint)
    for name in ("student.safetensors", "meta.json"):
        head = raw.head_object(Bucket=s3_env, Key=f"enc/quarantine/fp/run/{name}", ChecksumMode="ENABLED")
        assert head["ServerSideEncryption"] == "AES256", name
        assert head["ChecksumSHA256"] and head["Metadata"]["sha256"]
    assert r["sha256"] == hashlib.sha256(student.read_bytes()).hexdigest()


def test_sse_kms_with_a_key_id(s3_env, s3_endpoint, tmp_path):
    key_id = _raw(s3_endpoint, "kms").create_key(Description="mimic test")["KeyMetadata"]["KeyId"]
    store = open_store(f"s3://{s3_env}", sse="aws:kms", kms_key_id=key_id, multipart_threshold=5 * MIB,
                       part_size=5 * MIB)
    raw = _raw(s3_endpoint)
    for name, size in (("small.bin", 10_000), ("big.bin", 5 * MIB + 10)):  # single PUT and multipart
        src = _write(tmp_path / name, size)
        put = store.put_file(src, name)
        head = raw.head_object(Bucket=s3_env, Key=name)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"].endswith(key_id), head
        assert head["Metadata"]["sha256"] == put["sha256"]
        assert store.get_file(name, tmp_path / f"back-{name}").read_bytes() == src.read_bytes()


def test_a_put_without_the_asked_encryption_is_redone(s3_env, s3_endpoint, tmp_path):
    src = _write(tmp_path / "s.bin", 5000)
    assert open_store(f"s3://{s3_env}").put_file(src, "s.bin")["uploaded"]  # stored unencrypted
    enc = open_store(f"s3://{s3_env}", sse="AES256")
    assert enc.put_file(src, "s.bin")["uploaded"] is True  # same bytes, but not encrypted: uploaded again
    assert _raw(s3_endpoint).head_object(Bucket=s3_env, Key="s.bin")["ServerSideEncryption"] == "AES256"
    assert enc.put_file(src, "s.bin")["uploaded"] is False


def test_a_server_that_ignores_the_encryption_header_is_caught(s3_env, s3_endpoint, fault_proxy, tmp_path):
    fault_proxy.strip_request_header("x-amz-server-side-encryption")
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url, sse="AES256")
    src = _write(tmp_path / "s.bin", 5000)
    with pytest.raises(StoreError, match=r"upload verification failed \(encryption none != AES256\); "
                                         r"the object was deleted") as e:
        store.put_file(src, "s.bin")
    assert "\n" not in str(e.value)
    assert "Contents" not in _raw(s3_endpoint).list_objects_v2(Bucket=s3_env)


def test_encryption_options_are_checked(s3_env):
    with pytest.raises(StoreError, match="sse must be one of AES256, aws:kms"):
        open_store(f"s3://{s3_env}", sse="aes")
    with pytest.raises(StoreError, match="kms_key_id needs sse='aws:kms'"):
        open_store(f"s3://{s3_env}", sse="AES256", kms_key_id="k")
