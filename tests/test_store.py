"""mimic.store against a real filesystem and a real S3 server (moto_server on loopback).

Network faults come from tests/services.py's FaultProxy between the client and moto, so the
retry, abort and verification paths run against real sockets and real S3 semantics.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from mimic.errors import MimicError, StoreError, StoreUnavailable
from mimic.store import LocalStore, S3Store, fetch, open_store, store_student
from services import free_port

MIB = 1 << 20


def _write(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.shake_256(f"{seed}".encode()).digest(size) if size else b"")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw(endpoint: str):
    """A plain boto3 client straight to moto, to check what the store really left there."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def _absent(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    return False


def _pending_uploads(client, bucket: str) -> list:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


def _tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".mimic-tmp-")]


# --------------------------------------------------------------------------------------------
# local directory


def test_local_put_get_roundtrip_and_idempotent_skip(tmp_path):
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, LocalStore) and store.uri == str(tmp_path / "store")
    src = _write(tmp_path / "a.bin", 300_000)
    put = store.put_file(src, "runs/x/a.bin")
    dest = tmp_path / "store" / "runs" / "x" / "a.bin"
    assert put == {"uri": str(dest), "key": "runs/x/a.bin", "sha256": _sha(src), "size": 300_000, "uploaded": True,
                   "version_id": None}
    assert dest.read_bytes() == src.read_bytes()
    assert store.sha256("runs/x/a.bin") == _sha(src) and store.exists("runs/x/a.bin")
    assert store.sha256("runs/x/none") is None and not store.exists("runs/x/none")

    mtime = dest.stat().st_mtime_ns
    again = store.put_file(src, "runs/x/a.bin")
    assert again["uploaded"] is False and again["sha256"] == put["sha256"]
    assert dest.stat().st_mtime_ns == mtime  # not rewritten

    _write(src, 1000, seed=1)
    assert store.put_file(src, "runs/x/a.bin")["uploaded"] is True and dest.read_bytes() == src.read_bytes()

    out = store.get_file("runs/x/a.bin", tmp_path / "out" / "copy.bin")
    assert out == tmp_path / "out" / "copy.bin" and out.read_bytes() == src.read_bytes()
    store.put_json({"b": 1, "a": [1, 2]}, "runs/x/meta.json")
    assert json.loads(dest.with_name("meta.json").read_text()) == {"a": [1, 2], "b": 1}
    assert [e["key"] for e in store.list()] == ["runs/x/a.bin", "runs/x/meta.json"]
    assert [e["key"] for e in store.list("runs/x/m")] == ["runs/x/meta.json"]
    assert store.list("nothing/") == []
    assert store.list()[0]["size"] == 1000
    assert not _tmp_leftovers(tmp_path)
    with pytest.raises(StoreError, match="no such object") as e:
        store.get_file("runs/none", tmp_path / "x")
    _one_line(e)


def test_local_put_interrupted_before_rename_leaves_old_object_and_no_temp_files(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "s")
    old = _write(tmp_path / "old", 5000, seed=1)
    store.put_file(old, "k/obj")
    new = _write(tmp_path / "new", 7000, seed=2)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)  # the last step of the write fails
    with pytest.raises(StoreError, match="No space left") as e:
        store.put_file(new, "k/obj")
    _one_line(e)
    monkeypatch.undo()
    assert (tmp_path / "s" / "k" / "obj").read_bytes() == old.read_bytes()
    assert not _tmp_leftovers(tmp_path)
    assert [x["key"] for x in store.list()] == ["k/obj"]


def test_local_uris_and_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = open_store(None)
    assert isinstance(default, LocalStore) and default.root == tmp_path / "runs" / "store"
    assert open_store("").root == tmp_path / "runs" / "store"
    assert open_store(f"file://{tmp_path}/st").root == tmp_path / "st"
    assert open_store("rel/dir").root == tmp_path / "rel" / "dir"
    src = _write(tmp_path / "f", 10)
    for bad in ["", "/abs", "a/../b", "a//b", "./a", "a/", "a\\b", "a/.mimic-tmp-x", "a\nb", "a\x1b[0m"]:
        with pytest.raises(StoreError, match="invalid store key"):
            default.put_file(src, bad)
    with pytest.raises(StoreError, match="invalid store key"):
        default.list("../")
    with pytest.raises(StoreError, match="unsupported store URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="invalid bucket name"):
        open_store("s3://ab")
    with pytest.raises(StoreError, match="no such file"):
        default.put_file(tmp_path / "missing", "k")
    assert issubclass(StoreError, MimicError)


def test_fetch_local_path_is_returned_as_is(tmp_path):
    f = _write(tmp_path / "teacher.pth", 10)
    assert fetch(str(f), tmp_path / "cache") == f
    assert fetch(f"file://{f}", tmp_path / "cache") == f
    with pytest.raises(StoreError, match="no such file"):
        fetch(str(tmp_path / "none.pth"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_store_student_local_layout(tmp_path):
    store = LocalStore(tmp_path / "s")
    student = _write(tmp_path / "work" / "student.pt", 4000)
    meta_in = {"teacher_asr": 99.0, "config": {"epochs": 2}}
    r = store_student(store, "fp123", student, meta_in, "run1", verdict="sanitized")
    root = tmp_path / "s" / "sanitized" / "fp123" / "run1"
    assert r == {"area": "sanitized", "student_uri": str(root / "student.pt"), "meta_uri": str(root / "meta.json"),
                 "sha256": _sha(student), "size": 4000, "uploaded": True, "version_id": None, "meta_version_id": None}
    meta = json.loads((root / "meta.json").read_text())
    assert meta == {"teacher_asr": 99.0, "config": {"epochs": 2}, "sha256": _sha(student), "size": 4000,
                    "teacher_fingerprint": "fp123", "run": "run1", "area": "sanitized",
                    "student_uri": str(root / "student.pt"), "student_version_id": None}
    assert _sha(root / "student.pt") == meta["sha256"]
    again = store_student(store, "fp123", student, meta_in, "run1", verdict="sanitized")
    assert again["uploaded"] is False
    _write(student, 5000, seed=3)  # a different student for the same teacher and run replaces the old one
    r2 = store_student(store, "fp123", student, {}, "run1", verdict="sanitized")
    assert r2["uploaded"] is True
    assert json.loads((root / "meta.json").read_text())["sha256"] == _sha(root / "student.pt")

    rejected = store_student(store, "fp123", student, {}, "run2", verdict="rejected")
    qroot = tmp_path / "s" / "quarantine" / "fp123" / "run2"
    assert rejected["area"] == "quarantine" and rejected["student_uri"] == str(qroot / "student.pt")
    assert json.loads((qroot / "meta.json").read_text())["area"] == "quarantine"
    assert [e["key"] for e in store.list("sanitized/")] == ["sanitized/fp123/run1/meta.json",
                                                            "sanitized/fp123/run1/student.pt"]
    assert [e["key"] for e in store.list("quarantine/")] == ["quarantine/fp123/run2/meta.json",
                                                             "quarantine/fp123/run2/student.pt"]
    with pytest.raises(StoreError, match="invalid teacher fingerprint"):
        store_student(store, "../x", student, {}, "r", verdict="sanitized")
    with pytest.raises(StoreError, match="invalid run name"):
        store_student(store, "fp", student, {}, "a/b", verdict="sanitized")
    with pytest.raises(StoreError, match="invalid verdict 'passed'"):
        store_student(store, "fp", student, {}, "r", verdict="passed")


# --------------------------------------------------------------------------------------------
# S3 (moto on loopback)


def test_s3_put_get_roundtrip_with_checksum_and_metadata(s3_env, s3_endpoint, tmp_path):
    bucket = s3_env
    store = open_store(f"s3://{bucket}/runs/a/")
    assert isinstance(store, S3Store) and store.uri == f"s3://{bucket}/runs/a"
    src = _write(tmp_path / "w.bin", 200_000)
    put = store.put_file(src, "enc/w.bin")
    assert put == {"uri": f"s3://{bucket}/runs/a/enc/w.bin", "key": "enc/w.bin", "sha256": _sha(src),
                   "size": 200_000, "uploaded": True, "version_id": None}

    raw = _raw(s3_endpoint)
    head = raw.head_object(Bucket=bucket, Key="runs/a/enc/w.bin", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == _sha(src)
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(src.read_bytes()).digest()).decode()
    assert raw.get_object(Bucket=bucket, Key="runs/a/enc/w.bin")["Body"].read() == src.read_bytes()

    assert store.sha256("enc/w.bin") == _sha(src) and store.exists("enc/w.bin")
    assert store.sha256("enc/none") is None and not store.exists("enc/none")
    out = store.get_file("enc/w.bin", tmp_path / "dl" / "w.bin")
    assert out.read_bytes() == src.read_bytes() and not _tmp_leftovers(tmp_path)
    store.put_json({"z": 1}, "enc/meta.json")
    listing = store.list()
    assert [e["key"] for e in listing] == ["enc/meta.json", "enc/w.bin"]
    assert listing[1]["size"] == 200_000 and listing[1]["etag"]
    assert [e["key"] for e in store.list("enc/w")] == ["enc/w.bin"]
    assert store.delete("enc/meta.json") and not store.delete("enc/meta.json")
    with pytest.raises(StoreError, match="no such object") as e:
        store.get_file("enc/none", tmp_path / "none")
    _one_line(e)
    assert not (tmp_path / "none").exists()


def test_s3_idempotent_reput_sends_no_upload(s3_env, fault_proxy, tmp_path):
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url)
    src = _write(tmp_path / "w.bin", 50_000)
    assert store.put_file(src, "w.bin")["uploaded"] is True
    assert len(fault_proxy.log("PUT")) == 1
    again = store.put_file(src, "w.bin")
    assert again["uploaded"] is False and again["sha256"] == _sha(src)
    assert len(fault_proxy.log("PUT")) == 1  # only a HEAD went out
    _write(src, 50_000, seed=9)
    assert store.put_file(src, "w.bin")["uploaded"] is True and len(fault_proxy.log("PUT")) == 2


def test_s3_multipart_roundtrip(s3_env, s3_endpoint, tmp_path):
    store = open_store(f"s3://{s3_env}", multipart_threshold=5 * MIB, part_size=5 * MIB)
    src = _write(tmp_path / "big.bin", 6 * MIB + 123)
    put = store.put_file(src, "big.bin")
    assert put["uploaded"] and put["sha256"] == _sha(src)
    raw = _raw(s3_endpoint)
    head = raw.head_object(Bucket=s3_env, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-2") and head["Metadata"]["sha256"] == _sha(src)
    assert _pending_uploads(raw, s3_env) == []
    assert store.get_file("big.bin", tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert store.put_file(src, "big.bin")["uploaded"] is False


def test_store_student_s3_writes_meta_last(s3_env, s3_endpoint, fault_proxy, tmp_path):
    store = open_store(f"s3://{s3_env}/audits", endpoint_url=fault_proxy.url)
    student = _write(tmp_path / "student.safetensors", 30_000)
    r = store_student(store, "abc123", student, {"student_asr": 1.5}, "k1", verdict="sanitized")
    base = f"s3://{s3_env}/audits/sanitized/abc123/k1"
    assert r == {"area": "sanitized", "student_uri": f"{base}/student.safetensors", "meta_uri": f"{base}/meta.json",
                 "sha256": _sha(student), "size": 30_000, "uploaded": True, "version_id": None,
                 "meta_version_id": None}
    writes = [q.path.rsplit("/", 1)[-1] for q in fault_proxy.log("PUT")]
    assert writes == ["student.safetensors", "meta.json"]
    raw = _raw(s3_endpoint)
    meta = json.loads(raw.get_object(Bucket=s3_env, Key="audits/sanitized/abc123/k1/meta.json")["Body"].read())
    assert meta == {"student_asr": 1.5, "sha256": _sha(student), "size": 30_000, "teacher_fingerprint": "abc123",
                    "run": "k1", "area": "sanitized", "student_uri": f"{base}/student.safetensors",
                    "student_version_id": None}
    body = raw.get_object(Bucket=s3_env, Key="audits/sanitized/abc123/k1/student.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == meta["sha256"]
    head = raw.head_object(Bucket=s3_env, Key="audits/sanitized/abc123/k1/student.safetensors", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()


def test_fetch_s3_downloads_once_and_refetches_a_changed_object(s3_env, s3_endpoint, fault_proxy, tmp_path):
    raw = _raw(s3_endpoint)
    raw.put_object(Bucket=s3_env, Key="teachers/model.pth", Body=b"version-1" * 1000)
    uri, cache = f"s3://{s3_env}/teachers/model.pth", tmp_path / "cache"
    first = fetch(uri, cache, endpoint_url=fault_proxy.url)
    assert first.name == "model.pth" and first.read_bytes() == b"version-1" * 1000
    assert first.is_relative_to(cache / s3_env / "teachers")
    assert fetch(uri, cache, endpoint_url=fault_proxy.url) == first
    assert len(fault_proxy.log("GET")) == 1  # the second call only headed the object

    raw.put_object(Bucket=s3_env, Key="teachers/model.pth", Body=b"version-2" * 1000)
    second = fetch(uri, cache, endpoint_url=fault_proxy.url)
    assert second != first and second.read_bytes() == b"version-2" * 1000
    assert len(fault_proxy.log("GET")) == 2
    assert not _tmp_leftovers(cache)


def test_fetch_missing_s3_object_or_bucket(s3_env, tmp_path):
    with pytest.raises(StoreError, match=f"s3://{s3_env}/none.pth: no such object") as e:
        fetch(f"s3://{s3_env}/none.pth", tmp_path)
    _one_line(e)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-x' does not exist"):
        fetch("s3://no-such-bucket-x/t.pth", tmp_path)
    with pytest.raises(StoreError, match="no object key"):
        fetch(f"s3://{s3_env}/", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# faults


def test_endpoint_down_fails_after_exactly_retries_attempts(s3_env, fault_proxy, tmp_path):
    fault_proxy.refuse()
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url, retries=3)
    src = _write(tmp_path / "w.bin", 1000)
    store.client  # boto3 loaded and the client built before the clock starts
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as e:
        store.put_file(src, "w.bin")
    elapsed = time.monotonic() - t0
    msg = _one_line(e)
    assert msg.startswith(f"s3://{s3_env}/w.bin: upload failed after 3 attempts: "), msg
    assert fault_proxy.connections == 3  # botocore's retries, the only layer
    assert elapsed < 6, elapsed  # standard mode's jittered backoff: at most 1 + 2 s


def test_nothing_listening_fails_fast_with_default_settings(s3_env, tmp_path):
    store = open_store(f"s3://{s3_env}", endpoint_url=f"http://127.0.0.1:{free_port()}")
    store.client  # boto3 loaded and the client built before the clock starts
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="download failed after 3 attempts: Could not connect") as e:
        store.get_file("k", tmp_path / "k")
    _one_line(e)
    assert time.monotonic() - t0 < 10  # defaults: 3 attempts, backoff at most 1 + 2 s
    assert not (tmp_path / "k").exists()
    one = open_store(f"s3://{s3_env}", endpoint_url=f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(StoreUnavailable, match="lookup failed after 1 attempts"):
        one.exists("k")


def test_blackholed_endpoint_is_bounded_by_the_connect_timeout(s3_env, tmp_path):
    """A listener whose accept queue is full: the kernel drops further SYNs, connects time out."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        fillers = []
        try:
            for _ in range(4):  # fill the accept queue (never accepted)
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(listener.getsockname())
                fillers.append(c)
            time.sleep(0.2)
            store = open_store(f"s3://{s3_env}", endpoint_url=url, retries=2, connect_timeout=0.5)
            store.client  # boto3 loaded and the client built before the clock starts
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="lookup failed after 2 attempts: Connect timeout") as e:
                store.exists("k")
            elapsed = time.monotonic() - t0
        finally:
            for c in fillers:
                c.close()
    _one_line(e)
    assert 0.9 <= elapsed < 5, elapsed  # two 0.5 s connect timeouts and at most 1 s of backoff


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried(s3_env, s3_endpoint, fault_proxy, tmp_path, status):
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url)
    src = _write(tmp_path / "w.bin", 20_000)
    fault_proxy.fail_next(2, status=status)
    put = store.put_file(src, "w.bin")
    assert put["uploaded"] and len(fault_proxy.log(outcome=f"failed-{status}")) == 2
    assert _raw(s3_endpoint).get_object(Bucket=s3_env, Key="w.bin")["Body"].read() == src.read_bytes()
    fault_proxy.fail_next(1, status=status, method="GET")
    assert store.get_file("w.bin", tmp_path / "back").read_bytes() == src.read_bytes()
    fault_proxy.fail_next(3, status=status)
    with pytest.raises(StoreUnavailable, match=f"lookup failed after 3 attempts: HTTP {status}") as e:
        store.exists("w.bin")
    _one_line(e)


@pytest.mark.parametrize("size,threshold", [(300_000, 5 * MIB), (6 * MIB, 5 * MIB)], ids=["single", "multipart"])
def test_upload_dropped_once_is_retried_and_complete(s3_env, s3_endpoint, fault_proxy, tmp_path, size, threshold):
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url, multipart_threshold=threshold, part_size=5 * MIB)
    src = _write(tmp_path / "w.bin", size)
    fault_proxy.drop_uploads(after=65536, times=1)
    assert store.put_file(src, "w.bin")["sha256"] == _sha(src)
    assert len(fault_proxy.log(outcome="dropped")) == 1
    raw = _raw(s3_endpoint)
    body = raw.get_object(Bucket=s3_env, Key="w.bin")["Body"].read()
    assert body == src.read_bytes()
    assert _pending_uploads(raw, s3_env) == []


@pytest.mark.parametrize("size,threshold", [(300_000, 5 * MIB), (6 * MIB, 5 * MIB)], ids=["single", "multipart"])
def test_upload_that_always_drops_leaves_nothing_behind(s3_env, s3_endpoint, fault_proxy, tmp_path, size, threshold):
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url, retries=3,
                       multipart_threshold=threshold, part_size=5 * MIB)
    src = _write(tmp_path / "w.bin", size)
    fault_proxy.drop_uploads(after=65536)
    with pytest.raises(StoreUnavailable, match="upload failed after 3 attempts") as e:
        store.put_file(src, "w.bin")
    _one_line(e)
    # the failing request (the PUT, or a part) was tried 3 times by botocore, and no request more often
    # (once one part has failed for good, the transfer manager stops the others)
    per_request = Counter(q.path for q in fault_proxy.log(outcome="dropped"))
    assert max(per_request.values()) == 3 and all(n <= 3 for n in per_request.values()), per_request
    raw = _raw(s3_endpoint)
    assert _absent(raw, s3_env, "w.bin")
    assert _pending_uploads(raw, s3_env) == []  # the transfer manager aborted the multipart upload
    if threshold < size:
        assert len(fault_proxy.log("DELETE")) == 1


def test_truncated_download_is_requested_again_then_refused_without_a_partial_file(s3_env, s3_endpoint, fault_proxy,
                                                                                    tmp_path):
    data = hashlib.shake_256(b"t").digest(300_000)
    _raw(s3_endpoint).put_object(Bucket=s3_env, Key="t.bin", Body=data)
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url)
    fault_proxy.truncate_responses(after=100_000, times=1)
    out = store.get_file("t.bin", tmp_path / "dl" / "t.bin")  # s3transfer asks for the body again
    assert out.read_bytes() == data and len(fault_proxy.log("GET", outcome="truncated")) == 1
    fault_proxy.clear_log()
    fault_proxy.truncate_responses(after=100_000)
    with pytest.raises(StoreUnavailable, match="download failed after 2 attempts") as e:
        store.get_file("t.bin", tmp_path / "dl" / "again.bin")
    _one_line(e)
    assert len(fault_proxy.log("GET", outcome="truncated")) == 2
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["t.bin"]  # no partial or temporary file


def test_download_that_does_not_match_the_stored_sha256_never_appears(s3_env, s3_endpoint, tmp_path):
    raw = _raw(s3_endpoint)
    raw.put_object(Bucket=s3_env, Key="lie.bin", Body=b"actual bytes", Metadata={"sha256": "0" * 64})
    store = open_store(f"s3://{s3_env}")
    dest = _write(tmp_path / "lie.bin", 10, seed=5)
    before = dest.read_bytes()
    with pytest.raises(StoreError, match="download verification failed") as e:
        store.get_file("lie.bin", dest)
    _one_line(e)
    assert dest.read_bytes() == before and not _tmp_leftovers(tmp_path)  # the old file is untouched


def test_corrupted_upload_is_detected_and_deleted(s3_env, s3_endpoint, fault_proxy, tmp_path):
    store = open_store(f"s3://{s3_env}", endpoint_url=fault_proxy.url)
    src = _write(tmp_path / "w.bin", 10_000)
    fault_proxy.corrupt_next_upload()
    with pytest.raises(StoreError, match="upload verification failed .*ETag.*the object was deleted") as e:
        store.put_file(src, "w.bin")
    _one_line(e)
    assert _absent(_raw(s3_endpoint), s3_env, "w.bin")
    assert store.put_file(src, "w.bin")["uploaded"] is True  # a clean retry by the caller works


def test_missing_bucket_fails_at_once_without_retries(s3_env, fault_proxy, tmp_path):
    name = f"missing-{uuid.uuid4().hex[:8]}"
    store = open_store(f"s3://{name}/p", endpoint_url=fault_proxy.url, retries=4)
    src = _write(tmp_path / "w.bin", 1000)
    store.client  # boto3 loaded and the client built before the clock starts
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        store.put_file(src, "w.bin")
    assert time.monotonic() - t0 < 1.0  # 404s are not retried
    msg = _one_line(e)
    assert msg.startswith(f"bucket '{name}' does not exist (s3://{name}/p at {fault_proxy.url})"), msg
    assert [(q.method, q.outcome) for q in fault_proxy.requests] == [("HEAD", "forwarded"), ("HEAD", "forwarded")]
    with pytest.raises(StoreError, match=f"bucket '{name}' does not exist"):
        store.list()


def test_missing_credentials_name_the_env_vars(s3_env, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{s3_env}")
    store.client  # boto3 loaded and the client built before the clock starts
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as e:
        store.exists("k")
    _one_line(e)
    assert time.monotonic() - t0 < 2


def test_importing_the_store_does_not_import_boto3():
    code = "import sys, mimic, mimic.store; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False False", r.stdout + r.stderr


def test_without_boto3_local_stores_work_and_s3_says_what_is_missing(tmp_path):
    code = ("import sys\n"
            "for m in ('boto3', 'botocore', 's3transfer'): sys.modules[m] = None  # not importable\n"
            "from mimic.errors import StoreError\n"
            "from mimic.store import open_store\n"
            f"local = open_store({str(tmp_path / 's')!r})\n"
            "local.put_json({'a': 1}, 'k/meta.json')\n"
            "print([o['key'] for o in local.list()])\n"
            "try:\n"
            "    open_store('s3://bucket/p').exists('k')\n"
            "except StoreError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["['k/meta.json']", "s3:// stores need boto3 (pip install boto3)"], r.stdout + r.stderr
