"""A store in an S3 bucket (or an S3-compatible server), on boto3's maintained machinery.

* **Transfers**: boto3's transfer manager (``upload_file`` / ``upload_fileobj`` /
  ``download_fileobj`` with a :class:`boto3.s3.transfer.TransferConfig`): single PUT below
  ``multipart_threshold``, else a multipart upload in ``part_size`` parts, ``max_concurrency``
  threads; a failed multipart upload is aborted by the transfer manager. Every PUT carries
  ``ChecksumAlgorithm=SHA256`` (a precomputed full-object ``ChecksumSHA256`` on single PUTs, so
  the server checks the bytes against the file we hashed), the hex SHA-256 in the metadata
  ``sha256`` and, if asked, server-side encryption (``sse="AES256"`` or ``"aws:kms"`` with
  ``kms_key_id``).
* **Retries: one layer, botocore's standard retry mode** (``retries`` = total attempts per
  request; exponential backoff with jitter; connection errors, timeouts, 5xx, throttling). After
  that a failure is a one-line :class:`StoreUnavailable`; 4xx answers are a :class:`StoreError`
  at once. The only other re-request is s3transfer's for a download body cut mid-stream (which
  botocore cannot retry: its answer had begun), at most ``STREAM_ATTEMPTS`` times.
* **What we add**: after an upload the object is headed and its size, ``sha256`` metadata,
  SHA-256 checksum, MD5 ETag (when S3 makes ETags MD5s) and encryption are compared with what
  was sent; on a mismatch that version is deleted and StoreError raised. A put is skipped when
  the same SHA-256, size and encryption are already stored. Downloads are hashed on the way to a
  temporary file (:func:`mimic.io.atomic_write`) and appear at their destination only when size
  and SHA-256 match the stored ones. On a versioned bucket the VersionId is returned and
  downloads are pinned to the version that was headed.

The endpoint, credentials and region come from boto3's standard configuration (``AWS_*``
variables, ``~/.aws``); ``endpoint_url=`` overrides the endpoint, and with a custom endpoint
path-style addressing is used (MinIO, moto). boto3 is imported when the store is first used.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from mimic.errors import StoreError
from mimic.io import atomic_write
from mimic.store import s3errors
from mimic.store.base import MIB, Digest, Source, Store, digest, one_line, put_result
from mimic.store.keys import Listing, Skipped, check_key, key_problem

log = logging.getLogger("mimic")
T = TypeVar("T")

MULTIPART_THRESHOLD = 64 * MIB  # objects at least this large go up (and down) in parts
PART_SIZE = 16 * MIB  # part size (s3transfer grows it for objects that would need more than 10,000 parts)
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_CONCURRENCY = 4  # transfer threads per upload/download
ATTEMPTS = 3  # per request, the first included (botocore's standard-mode default)
CONNECT_TIMEOUT = 5.0  # seconds
READ_TIMEOUT = 15.0  # seconds without a byte from the server (raise it for slow S3-compatible servers)
STREAM_ATTEMPTS = 2  # s3transfer's requests of a download body that broke mid-stream
SSE_MODES = ("AES256", "aws:kms")
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MD5_ETAG_RE = re.compile(r"[0-9a-f]{32}(-\d+)?")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (no URL decoding: S3 keys are taken verbatim)."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri}: not an s3:// URI")
    bucket, _, rest = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise StoreError(f"{uri}: invalid bucket name {bucket!r} (3-255 letters, digits, '.', '-', '_')")
    return bucket, rest.strip("/")


def stored_sha256(head: dict) -> str | None:
    """The object's SHA-256 hex from its ``sha256`` metadata or a full-object checksum."""
    meta = (head.get("Metadata") or {}).get("sha256", "")
    if _SHA_RE.fullmatch(meta):
        return meta
    checksum, etag = head.get("ChecksumSHA256") or "", head.get("ETag") or ""
    full_object = head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    if checksum and "-" not in checksum and "-" not in etag and full_object:
        raw = base64.b64decode(checksum)
        if len(raw) == 32:
            return raw.hex()
    return None


def version_of(head: dict) -> str | None:
    """The VersionId of a headed object on a versioned bucket, else None ("null": versioning suspended)."""
    v = head.get("VersionId")
    return None if v in (None, "", "null") else str(v)


def _etag_is_md5(head: dict) -> bool:
    """S3 ETags are (composite) MD5s except for SSE-KMS and SSE-C objects."""
    return (head.get("ServerSideEncryption") in (None, "AES256") and not head.get("SSECustomerAlgorithm")
            and bool(_MD5_ETAG_RE.fullmatch((head.get("ETag") or "").strip('"'))))


class _HashingWriter:
    """A write-only, non-seekable target: s3transfer then writes the parts in order, so the bytes
    are hashed on their way to the temporary file (no second read)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False


class S3Store(Store):
    """A bucket and optional key prefix on S3 or an S3-compatible server (see the module docstring).

    ``retries``: attempts per request (botocore standard mode). ``connect_timeout`` /
    ``read_timeout``: seconds per attempt. ``multipart_threshold`` / ``part_size`` /
    ``max_concurrency``: the transfer manager's settings. ``sse``: ``"AES256"``, ``"aws:kms"``
    (``kms_key_id`` optional: the bucket's default KMS key otherwise) or None. ``verify_etag=False``
    skips the MD5-ETag comparison, for servers whose ETags are not MD5s.
    """

    def __init__(self, bucket: str, prefix: str = "", *, retries: int = ATTEMPTS, endpoint_url: str | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 max_concurrency: int = MAX_CONCURRENCY, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, verify_etag: bool = True, sse: str | None = None,
                 kms_key_id: str | None = None) -> None:
        if not _BUCKET_RE.fullmatch(bucket):
            raise StoreError(f"invalid bucket name {bucket!r} (3-255 letters, digits, '.', '-', '_')")
        if retries < 1 or max_concurrency < 1 or connect_timeout <= 0 or read_timeout <= 0:
            raise StoreError(f"retries and max_concurrency must be >= 1 and timeouts > 0 (got {retries}, "
                             f"{max_concurrency}, {connect_timeout}, {read_timeout})")
        if part_size < MIN_PART_SIZE:
            raise StoreError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), got {part_size}")
        if sse not in (None, *SSE_MODES):
            raise StoreError(f"sse must be one of {', '.join(SSE_MODES)} or None, not {sse!r}")
        if kms_key_id and sse != "aws:kms":
            raise StoreError("kms_key_id needs sse='aws:kms'")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.retries, self.endpoint_url = retries, endpoint_url or None
        self.multipart_threshold, self.part_size, self.max_concurrency = multipart_threshold, part_size, max_concurrency
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.verify_etag, self.sse, self.kms_key_id = verify_etag, sse, kms_key_id or None
        self._client: Any = None
        self._transfer: Any = None
        self._bucket_checked = False

    # -- plumbing --------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The boto3 S3 client (created, and boto3 imported, on first use)."""
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as e:
                raise StoreError("s3:// stores need boto3 (pip install boto3)") from e
            custom = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            config = Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                            retries={"mode": "standard", "total_max_attempts": self.retries},
                            max_pool_connections=max(10, self.max_concurrency),
                            **({"s3": {"addressing_style": "path"}} if custom else {}))
            try:
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
            except Exception as e:  # bad endpoint URL, unknown profile, broken ~/.aws/config
                raise StoreError(f"{self.uri}: cannot create an S3 client: {one_line(e)}") from e
        return self._client

    @property
    def transfer(self) -> Any:
        """The :class:`boto3.s3.transfer.TransferConfig` of every upload and download."""
        if self._transfer is None:
            from boto3.s3.transfer import TransferConfig

            cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.part_size,
                                 max_concurrency=self.max_concurrency, num_download_attempts=STREAM_ATTEMPTS,
                                 preferred_transfer_client="classic")
            cfg.max_in_memory_download_chunks = self.max_concurrency  # ordered writes buffer <= this many parts
            self._transfer = cfg
        return self._transfer

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T], *, on_status: dict[int, Any] | None = None) -> T:
        """Run ``fn`` (botocore retries inside it); map failures to one-line StoreErrors.

        ``on_status`` maps HTTP statuses to return values (e.g. ``{404: None}`` for a lookup).
        """
        try:
            return fn()
        except StoreError:
            raise
        except Exception as e:
            from botocore.exceptions import ClientError

            cause, _ = s3errors.unwrap(e)
            if on_status and isinstance(cause, ClientError):
                status = s3errors.client_error(cause)[0]
                if status in on_status:
                    return on_status[status]
            endpoint = str(self._client.meta.endpoint_url) if self._client is not None else "?"
            raise s3errors.failure(e, what=what, where=self.url(key) if key else self.uri, attempts=self.retries,
                                   stream_attempts=STREAM_ATTEMPTS, bucket=self.bucket, endpoint=endpoint) from e

    def _require_bucket(self, what: str) -> None:
        """Raise StoreError if the bucket does not exist (checked once per store)."""
        if self._bucket_checked:
            return
        # 403: we may lack s3:ListBucket yet be allowed to read and write objects
        found = self._call(what, None, lambda: self.client.head_bucket(Bucket=self.bucket),
                           on_status={404: None, 403: {}})
        if found is None:
            raise StoreError(f"bucket '{self.bucket}' does not exist ({self.uri} at {self.endpoint})")
        self._bucket_checked = True

    def head(self, key: str, what: str = "lookup") -> dict | None:
        """``head_object`` of ``key`` (with checksums), or None if absent (StoreError if the bucket is)."""
        full = self._full(key)
        head = self._call(what, key, lambda: self.client.head_object(
            Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"), on_status={404: None})
        if head is None:
            self._require_bucket(what)
        return head

    # -- encryption ------------------------------------------------------------------------
    def _sse_args(self) -> dict:
        if self.sse is None:
            return {}
        return {"ServerSideEncryption": self.sse, **({"SSEKMSKeyId": self.kms_key_id} if self.kms_key_id else {})}

    def _sse_problem(self, head: dict) -> str | None:
        """How the object's encryption differs from what this store asks for (None: as asked)."""
        if self.sse is None:
            return None
        got = head.get("ServerSideEncryption")
        if got != self.sse:
            return f"encryption {got or 'none'} != {self.sse}"
        kid, got_kid = self.kms_key_id, str(head.get("SSEKMSKeyId") or "")
        if kid and "alias/" not in kid and got_kid not in (kid, "") and not got_kid.endswith(f"/{kid}") \
                and not kid.endswith(f"/{got_kid}"):
            return f"KMS key {got_kid} != {kid}"
        return None

    # -- writes ----------------------------------------------------------------------------
    def _put(self, source: Source, key: str) -> dict:
        size = source.size()
        multipart = size >= self.multipart_threshold
        if multipart:
            from s3transfer.utils import ChunksizeAdjuster  # the part size the transfer manager will use

            d = digest(source, ChunksizeAdjuster().adjust_chunksize(self.part_size, size))
        else:
            d = digest(source, 0)
        url = self.url(key)
        head = self.head(key, "upload")
        if (head is not None and stored_sha256(head) == d.sha256 and head.get("ContentLength") == d.size
                and self._sse_problem(head) is None):
            return put_result(url, key, d, uploaded=False, version_id=version_of(head))
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": d.sha256}, **self._sse_args()}
        if not multipart:
            extra["ChecksumSHA256"] = d.checksum  # the server checks the body against the file we hashed
        full = self._full(key)

        def upload() -> None:
            if source.path is not None:
                self.client.upload_file(str(source.path), self.bucket, full, ExtraArgs=extra, Config=self.transfer)
            else:
                with source.open() as body:
                    self.client.upload_fileobj(body, self.bucket, full, ExtraArgs=extra, Config=self.transfer)

        self._call("upload", key, upload)
        head = self._verify(key, d)
        log.info("%s: uploaded %d bytes (sha256 %s)", url, d.size, d.sha256[:12])
        return put_result(url, key, d, uploaded=True, version_id=version_of(head))

    def _verify(self, key: str, d: Digest) -> dict:
        """Head the new object and compare it with what was sent; delete that version on any mismatch."""
        url = self.url(key)
        head = self.head(key, "upload verification")
        if head is None:
            raise StoreError(f"{url}: upload verification failed: no object after the upload")
        problems = []
        if head.get("ContentLength") != d.size:
            problems.append(f"size {head.get('ContentLength')} != {d.size}")
        if (head.get("Metadata") or {}).get("sha256") != d.sha256:
            problems.append("sha256 metadata differs")
        checksum = (head.get("ChecksumSHA256") or "").split("-")[0]
        if checksum and checksum != d.checksum:
            problems.append(f"SHA-256 checksum {checksum} != {d.checksum}")
        etag = (head.get("ETag") or "").strip('"')
        if self.verify_etag and _etag_is_md5(head) and etag != d.etag:
            problems.append(f"ETag {etag} != MD5 {d.etag}")
        if sse := self._sse_problem(head):
            problems.append(sse)
        if not problems:
            return head
        version = version_of(head)
        try:
            self._call("cleanup", key, lambda: self.client.delete_object(
                Bucket=self.bucket, Key=self._full(key), **({"VersionId": version} if version else {})))
            fate = "the object was deleted"
        except StoreError as e:
            fate = f"deleting it failed too: {e}"
        raise StoreError(f"{url}: upload verification failed ({'; '.join(problems)}); {fate}")

    def delete(self, key: str) -> bool:
        """Remove ``key`` (on a versioned bucket: a delete marker; older versions stay)."""
        if not self.exists(key):
            return False
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)))
        return True

    # -- reads -----------------------------------------------------------------------------
    def get_file(self, key: str, dest: str | Path) -> Path:
        head = self.head(key, "download")
        if head is None:
            raise StoreError(f"{self.url(key)}: no such object")
        return self.download(key, Path(dest), head)

    def download(self, key: str, dest: Path, head: dict) -> Path:
        """Download the object described by ``head`` to ``dest``: hashed on the way to a temporary
        file, which replaces ``dest`` only when its size and SHA-256 are the stored ones."""
        full, size, want, version = self._full(key), head.get("ContentLength"), stored_sha256(head), version_of(head)
        extra = {"ChecksumMode": "ENABLED", **({"VersionId": version} if version else {})}

        def write(out: IO[bytes]) -> None:
            sink = _HashingWriter(out)
            self._call("download", key, lambda: self.client.download_fileobj(
                self.bucket, full, sink, ExtraArgs=extra, Config=self.transfer))
            got = sink.sha.hexdigest()
            if sink.size != size or (want is not None and got != want):
                raise StoreError(f"{self.url(key)}: download verification failed (got {sink.size} bytes, sha256 "
                                 f"{got[:12]}; stored {size} bytes, sha256 {(want or '?')[:12]}); nothing was written")

        try:
            atomic_write(dest, write)
        except OSError as e:
            raise StoreError(f"{dest}: cannot write: {e.strerror or e}") from e
        return dest

    def sha256(self, key: str) -> str | None:
        head = self.head(key)
        return None if head is None else stored_sha256(head)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def _scan(self, prefix: str) -> Listing:
        base = f"{self.prefix}/" if self.prefix else ""

        def pages() -> Listing:
            out = Listing()
            # botocore asks for EncodingType=url and decodes the keys: control characters survive XML
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(base):]
                    why = key_problem(key) if obj["Key"].startswith(base) else "outside the store prefix"
                    if why:
                        out.skipped.append(Skipped(key, why))
                    else:
                        out.objects.append({"key": key, "size": obj["Size"], "etag": obj["ETag"].strip('"'),
                                            "modified": obj["LastModified"].timestamp()})
            return out

        return self._call("list", None, pages)
