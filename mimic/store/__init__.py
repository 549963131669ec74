"""Artifact store: a local directory by default, S3 (or an S3-compatible server) via boto3.

``open_store(uri)`` picks the backend: ``None``/``""`` is the directory ``runs/store`` (relative to
the working directory at the time of the call), a path or ``file:///abs`` is a directory
(:class:`LocalStore`), and ``s3://bucket/optional/prefix`` is a bucket (:class:`S3Store`). Keys
are relative ``a/b/c`` strings under that root, checked by one rule for both (:mod:`.keys`).

Guarantees, for both backends:

* **Atomic, verified writes.** An object appears under its key only complete and with the right
  SHA-256: locally through :func:`mimic.io.atomic_write`; on S3 through boto3's transfer manager
  with SHA-256 checksums, the hex digest in the metadata ``sha256``, and a HEAD afterwards that
  compares size, checksum, metadata, ETag and encryption with what was sent.
* **Idempotent puts.** When the same SHA-256 and size are already under the key, nothing is
  written and the result says ``"uploaded": False``.
* **Verified, atomic reads.** Downloads are hashed on their way to a temporary file and appear
  at their destination only when they match the stored size and SHA-256.
* **Listings judge each key on its own.** :meth:`Store.scan` returns the good objects and the odd
  keys (``a//b``, ``../x``, a temporary name, control characters, symlinks out of a local root)
  each with a reason; :meth:`Store.list` returns the good ones. One odd key never hides the rest.
* **One retry layer, bounded.** S3 requests are retried by botocore's standard retry mode only
  (``retries`` attempts per request); after that a one-line :class:`~mimic.errors.StoreUnavailable`.

Audited students go under ``sanitized/`` or ``quarantine/`` (:func:`store_student`).
boto3/botocore are imported only when an S3 store is first used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mimic.errors import StoreError
from mimic.store.base import Store
from mimic.store.keys import Listing, Skipped, check_key, check_prefix, key_problem
from mimic.store.local import LocalStore
from mimic.store.s3 import ATTEMPTS, S3Store, parse_s3_uri
from mimic.store.students import AREAS, store_student

__all__ = ["AREAS", "DEFAULT_ROOT", "Listing", "LocalStore", "S3Store", "Skipped", "Store", "check_key",
           "check_prefix", "fetch", "key_problem", "open_store", "parse_s3_uri", "store_student"]

log = logging.getLogger("mimic")
DEFAULT_ROOT = "runs/store"


def _local_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: only local file:// URIs are supported (file:///absolute/path)")
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise StoreError(f"{uri}: unsupported store URI scheme '{parts.scheme}' (use a path, file:// or s3://)")
    return Path(uri)


def open_store(uri: str | None, *, retries: int = ATTEMPTS, endpoint_url: str | None = None, sse: str | None = None,
               kms_key_id: str | None = None, **s3_options: object) -> Store:
    """The store at ``uri``: None/"" -> ``runs/store`` under the cwd, a path/``file://`` -> LocalStore,
    ``s3://bucket/prefix`` -> S3Store. S3 only: ``retries`` (attempts per request, botocore's
    standard retry mode), ``endpoint_url``, ``sse`` (``"AES256"`` / ``"aws:kms"``) with
    ``kms_key_id``, and ``s3_options`` (``multipart_threshold``, ``part_size``, ``max_concurrency``,
    ``connect_timeout``, ``read_timeout``, ``verify_etag``). Nothing is contacted until the first
    operation.
    """
    if not uri:
        return LocalStore(DEFAULT_ROOT)
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, retries=retries, endpoint_url=endpoint_url, sse=sse, kms_key_id=kms_key_id,
                       **s3_options)  # type: ignore[arg-type]
    return LocalStore(_local_path(uri))


def fetch(uri: str, cache_dir: str | Path, *, retries: int = ATTEMPTS, endpoint_url: str | None = None) -> Path:
    """A local path for ``uri``: a local path as is, an ``s3://bucket/key`` via a download cache.

    The cached copy lives at ``cache_dir/bucket/<key>@<etag>/<key's file name>``: an unchanged
    object is downloaded once, a changed one (new ETag) again. Downloads are verified and atomic.
    """
    if not uri.startswith("s3://"):
        path = _local_path(uri)
        if not path.exists():
            raise StoreError(f"{uri}: no such file")
        return path
    bucket, key = parse_s3_uri(uri)
    if not key:
        raise StoreError(f"{uri}: no object key (expected s3://bucket/key)")
    store = S3Store(bucket, retries=retries, endpoint_url=endpoint_url)
    head = store.head(key, "download")
    if head is None:
        raise StoreError(f"{uri}: no such object")
    tag = re.sub(r"[^A-Za-z0-9_-]", "", head.get("ETag") or "")[:80] or f"{head.get('ContentLength')}-nohash"
    *dirs, name = key.split("/")
    target = Path(cache_dir).joinpath(bucket, *dirs, f"{name}@{tag}", name)
    if target.is_file() and target.stat().st_size == head.get("ContentLength"):
        return target
    log.info("fetching %s -> %s", uri, target)
    return store.download(key, target, head)
