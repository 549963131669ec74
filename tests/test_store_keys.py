"""Listings judge each key on its own (issue 12, point 4): odd keys in a bucket or a store directory
are skipped one by one with a reason, and every good key is still listed. Same key rule for both
backends, and for writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mimic.errors import StoreError
from mimic.io import TMP_PREFIX
from mimic.store import LocalStore, Skipped, check_key, key_problem, open_store

GOOD = ["ok/a.pt", "ok/b.pt", "top.pt"]
# key -> the words its reason must contain
ODD = {
    "a//b.pt": "empty path segment",
    "../x.pt": "'..' path segment",
    "./x.pt": "'.' path segment",
    "a/./b.pt": "'.' path segment",
    "a\\b.pt": "backslash",
    f"{TMP_PREFIX}x.pt": "temporary name",
    f"ok/{TMP_PREFIX}y.pt": "temporary name",
    "new\nline.pt": "control character",
    "esc\x1b[31m.pt": "control character",
    "cr\r.pt": "control character",
    "sep\u2028.pt": "control character",
    "dir/": "folder marker",
    "/lead.pt": "absolute key",
}


@pytest.mark.parametrize("key", list(ODD))
def test_the_key_rule_names_each_odd_key(key):
    assert ODD[key] in key_problem(key)
    with pytest.raises(StoreError, match="invalid store key") as e:
        check_key(key)
    assert "\n" not in str(e.value)  # the key is quoted with repr: a newline cannot forge a line


@pytest.mark.parametrize("key", GOOD + ["a/.hidden", "a/b..c", "x" * 1000, "ünï/cödé.pt"])
def test_good_keys_pass(key):
    assert key_problem(key) is None and check_key(key) == key


def test_overlong_and_non_utf8_keys():
    assert "1024 bytes" in key_problem("x" * 1025)
    assert "not valid UTF-8" in key_problem(os.fsdecode(b"bad\xff.pt"))


# --------------------------------------------------------------------------------------------
# S3: the odd keys are put straight into moto, next to good ones


def _s3_keys(bucket: str, endpoint: str, prefix: str, keys: list[str]) -> None:
    import boto3

    raw = boto3.client("s3", endpoint_url=endpoint)
    for k in keys:
        raw.put_object(Bucket=bucket, Key=prefix + k, Body=b"x" * 7)


def test_s3_listing_skips_each_odd_key_and_lists_the_rest(s3_env, s3_endpoint):
    odd = [k for k in ODD if "\n" not in k]  # moto's router cannot take a newline in a key (S3 can)
    _s3_keys(s3_env, s3_endpoint, "in/", GOOD + odd)
    _s3_keys(s3_env, s3_endpoint, "", ["elsewhere.pt"])  # outside the store's prefix: not listed at all
    store = open_store(f"s3://{s3_env}/in")
    listing = store.scan()
    assert [o["key"] for o in listing.objects] == GOOD
    assert all(o["size"] == 7 and o["etag"] for o in listing.objects)
    skipped = dict(listing.skipped)
    assert sorted(skipped) == sorted(odd), skipped
    for key, reason in skipped.items():
        assert ODD[key] in reason, (key, reason)
    assert all(isinstance(s, Skipped) for s in listing.skipped)
    assert store.list() == listing.objects
    assert [o["key"] for o in store.list("ok/")] == ["ok/a.pt", "ok/b.pt"]
    [(key, reason)] = store.scan("ok/").skipped
    assert key == f"ok/{TMP_PREFIX}y.pt" and "temporary name" in reason
    with pytest.raises(StoreError, match="invalid store key prefix '../'"):
        store.scan("../")


@pytest.mark.parametrize("key", [k for k in ODD if k != "new\nline.pt"])
def test_s3_writes_refuse_each_odd_key(s3_env, key, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    store = open_store(f"s3://{s3_env}")
    with pytest.raises(StoreError, match="invalid store key"):
        store.put_file(src, key)


# --------------------------------------------------------------------------------------------
# a local store directory with odd names, links and non-files


def _local_tree(root: Path, outside: Path) -> dict[str, str]:
    """Good files plus every odd entry a filesystem can hold; returns {skipped key: reason words}."""
    for k in GOOD:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        (root / k).write_bytes(b"x" * 7)
    outside.mkdir()
    (outside / "secret.pt").write_bytes(b"not yours")
    (outside / "sub").mkdir()
    (outside / "sub" / "deep.pt").write_bytes(b"not yours")
    expect = {}
    for name in ["a\\b.pt", f"{TMP_PREFIX}x.pt", "new\nline.pt", "esc\x1b[31m.pt"]:
        (root / name).write_bytes(b"x")
        expect[name] = ODD[name]
    (root / "ok" / f"{TMP_PREFIX}y.pt").write_bytes(b"x")
    expect[f"ok/{TMP_PREFIX}y.pt"] = "temporary name"
    os.symlink(outside / "secret.pt", root / "leak.pt")
    expect["leak.pt"] = "symlink leading outside the store"
    os.symlink(outside / "sub", root / "leakdir")
    expect["leakdir/"] = "symlink leading outside the store"
    os.symlink(root / "ok", root / "alias")
    expect["alias/"] = "symlinked folder (not followed)"
    os.symlink(root / "top.pt", root / "ok" / "link-in.pt")  # a link inside the root is an object
    os.symlink(root / "missing.pt", root / "dangling.pt")
    expect["dangling.pt"] = "broken symlink"
    os.mkfifo(root / "pipe.pt")
    expect["pipe.pt"] = "not a regular file"
    (root / "bad\ndir").mkdir()
    (root / "bad\ndir" / "inner.pt").write_bytes(b"x")
    expect["bad\ndir/"] = "control character"
    os.mkdir(os.fsencode(root) + b"/latin\xe9")
    expect["latin\\xe9/"] = "not valid UTF-8"
    return expect


def test_local_listing_skips_each_odd_entry_and_lists_the_rest(tmp_path):
    root = tmp_path / "store"
    expect = _local_tree(root, tmp_path / "outside")
    store = LocalStore(root)
    listing = store.scan()
    assert [o["key"] for o in listing.objects] == ["ok/a.pt", "ok/b.pt", "ok/link-in.pt", "top.pt"]
    assert all(o["size"] == 7 for o in listing.objects)
    skipped = dict(listing.skipped)
    assert sorted(skipped) == sorted(expect), skipped
    for key, words in expect.items():
        assert words in skipped[key], (key, skipped[key])
    assert "secret" not in repr(listing) and "deep.pt" not in repr(listing)  # nothing read or listed outside
    assert store.list() == listing.objects
    assert [o["key"] for o in store.list("ok/")] == ["ok/a.pt", "ok/b.pt", "ok/link-in.pt"]
    assert dict(store.scan("leak").skipped) == {"leak.pt": expect["leak.pt"], "leakdir/": expect["leakdir/"]}
    with pytest.raises(StoreError, match="invalid store key prefix"):
        store.scan("a/../")


def test_local_store_never_reads_or_writes_through_a_link_out_of_the_root(tmp_path):
    root = tmp_path / "store"
    _local_tree(root, tmp_path / "outside")
    store = LocalStore(root)
    src = tmp_path / "f"
    src.write_bytes(b"payload")
    for op in (lambda: store.get_file("leak.pt", tmp_path / "got"), lambda: store.sha256("leak.pt"),
               lambda: store.exists("leakdir/deep.pt"), lambda: store.put_file(src, "leakdir/new.pt"),
               lambda: store.put_file(src, "leakdir/sub2/new.pt")):
        with pytest.raises(StoreError, match="leads outside the store .* through a symlink") as e:
            op()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "got").exists()
    assert sorted(p.name for p in (tmp_path / "outside" / "sub").iterdir()) == ["deep.pt"]
    assert store.delete("leak.pt") and (tmp_path / "outside" / "secret.pt").read_bytes() == b"not yours"
    assert store.put_file(src, "ok/link-in.pt")["uploaded"]  # a link inside the root is replaced, not followed
    assert (root / "top.pt").read_bytes() == b"x" * 7 and not (root / "ok" / "link-in.pt").is_symlink()
