"""Artifact store: a local directory by default, S3 (or an S3-compatible server) via boto3.

``open_store(uri)`` picks the backend: ``None``/``""`` is the directory ``runs/store`` (relative to
the working directory at the time of the call), a path or ``file:///abs`` is a directory, and
``s3://bucket/optional/prefix`` is a bucket. Keys are relative ``a/b/c`` strings under that root.

Guarantees, for both backends:

* **Atomic, verified writes.** An object appears under its key only complete and with the right
  SHA-256. Locally: a temporary file in the same directory (hashed while it is written, fsynced)
  then ``os.replace``. On S3: a single PUT with a SHA-256 checksum (the server verifies it) and
  the hex digest in the object metadata ``sha256``, or, above ``multipart_threshold``, a multipart
  upload with a SHA-256 checksum per part; the object appears only when the upload is completed,
  and a failed upload is aborted (no orphan parts). Afterwards the object is headed and its
  size, metadata, checksum and (for unencrypted or SSE-S3 objects) MD5 ETag are compared with
  what was sent; on a mismatch the object is deleted and :class:`StoreError` is raised.
* **Idempotent puts.** When an object with the same SHA-256 and size is already under the key,
  nothing is written and the result says ``"uploaded": False``.
* **Verified, atomic reads.** Downloads go to a temporary file next to the destination, are
  checked against the stored size and SHA-256, then renamed into place.
* **Where the SHA-256 lives.** LocalStore recomputes it from the file (no sidecar files that could
  go stale); S3Store reads the object's ``sha256`` metadata (written by every put), falling back
  to a full-object ``ChecksumSHA256`` for objects written by other tools.

Network calls are retried by one loop here (botocore's own retries are off): ``retries`` attempts
with ``backoff * 2**i`` seconds between them, on connection errors, timeouts, 5xx and throttling.
4xx answers (missing bucket, access denied, ...) raise at once. Every failure the user has to act
on is a one-line :class:`StoreError`, e.g. ``s3://bkt/k: upload failed after 4 attempts: ...``.

The S3 endpoint, credentials and region come from boto3's standard configuration
(``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws``); ``endpoint_url=`` overrides the endpoint.
With a custom endpoint, path-style addressing is used (what MinIO, moto and most S3-compatible
servers expect). boto3 is imported only when an S3 store is first used.
"""

from __future__ import annotations

import abc
import base64
import builtins
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from mimic.errors import StoreError, StoreUnavailable

log = logging.getLogger("mimic")
T = TypeVar("T")

DEFAULT_ROOT = "runs/store"
MIB = 1 << 20
MULTIPART_THRESHOLD = 64 * MIB  # files at least this large go up in parts
PART_SIZE = 16 * MIB  # default part size (grown for files that would need more than 10,000 parts)
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
_CHUNK = MIB
_TMP_PREFIX = ".mimic-tmp-"
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MD5_ETAG_RE = re.compile(r"[0-9a-f]{32}(-\d+)?")
_RETRYABLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "BadDigest", "XAmzContentSHA256Mismatch",
})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                           "InvalidToken", "ExpiredToken", "AccountProblem"})


# --------------------------------------------------------------------------------------------
# keys, hashes, local files


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid relative store key (``a/b/c``), else raise StoreError."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid store key {key!r}: it is empty")
    parts = key.split("/")
    if "\\" in key or any(p in ("", ".", "..") for p in parts) or parts[-1].startswith(_TMP_PREFIX):
        raise StoreError(f"invalid store key {key!r}: use a relative 'a/b/c' key without '.', '..', '\\' "
                         f"or empty parts")
    return key


@dataclass(frozen=True)
class _Digest:
    sha256: str  # hex
    md5: str  # hex ("" when not computed)
    size: int


def _digest_file(path: Path, *, md5: bool = False) -> _Digest:
    """SHA-256 (and optionally MD5) and size of a file, read in 1 MiB chunks."""
    sha, m5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sha.update(chunk)
                if md5:
                    m5.update(chunk)
                size += len(chunk)
    except OSError as e:
        raise StoreError(f"{path}: cannot read: {e.strerror or e}") from e
    return _Digest(sha.hexdigest(), m5.hexdigest() if md5 else "", size)


def _source_file(local: str | Path) -> Path:
    path = Path(local)
    if not path.is_file():
        raise StoreError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    return path


def _atomic_copy(src: Path, dest: Path, expect_sha256: str | None = None) -> str:
    """Copy ``src`` to ``dest`` via a fsynced temp file + ``os.replace``; return the copy's SHA-256.

    If ``expect_sha256`` is given and the bytes copied differ (the source changed meanwhile),
    nothing is written and StoreError is raised.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{_TMP_PREFIX}{dest.name}.", suffix=".tmp")
    except OSError as e:
        raise StoreError(f"{dest}: cannot write: {e.strerror or e}") from e
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            while chunk := f.read(_CHUNK):
                out.write(chunk)
                sha.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        digest = sha.hexdigest()
        if expect_sha256 is not None and digest != expect_sha256:
            raise StoreError(f"{src}: the file changed while it was copied to {dest}; nothing was written")
        os.replace(tmp, dest)
        return digest
    except OSError as e:
        raise StoreError(f"{dest}: cannot write: {e.strerror or e}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)  # a no-op after os.replace


def _put_result(uri: str, key: str, digest: _Digest, uploaded: bool) -> dict:
    return {"uri": uri, "key": key, "sha256": digest.sha256, "size": digest.size, "uploaded": uploaded}


def _json_bytes(obj: dict) -> bytes:
    """Deterministic JSON (sorted keys), so an unchanged dict is an unchanged object."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# the interface


class Store(abc.ABC):
    """A flat namespace of immutable-by-content objects under a root URI (see module docstring)."""

    uri: str

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The full URI of ``key``: an absolute path (local) or ``s3://bucket/prefix/key``."""

    @abc.abstractmethod
    def put_file(self, local: str | Path, key: str) -> dict:
        """Store a file under ``key``, verified and atomically; skip it if already there.

        Returns ``{"uri", "key", "sha256", "size", "uploaded"}``; ``uploaded`` is False when an
        object with the same SHA-256 and size was already stored.
        """

    def put_json(self, obj: dict, key: str) -> dict:
        """Store ``obj`` as indented JSON with sorted keys (non-JSON values via ``str``)."""
        with tempfile.TemporaryDirectory(prefix="mimic-store-") as d:
            path = Path(d) / PurePosixPath(check_key(key)).name
            path.write_bytes(_json_bytes(obj))
            return self.put_file(path, key)

    @abc.abstractmethod
    def get_file(self, key: str, dest: str | Path) -> Path:
        """Copy the object ``key`` to ``dest`` (verified; temp file + ``os.replace``); return ``dest``."""

    @abc.abstractmethod
    def sha256(self, key: str) -> str | None:
        """The stored SHA-256 (hex) of ``key``; None if the object is absent (or, on S3, unknown)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[dict]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), sorted by key.

        Each entry: ``{"key", "size", "modified" (POSIX seconds), "etag" (S3) or None (local)}``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# --------------------------------------------------------------------------------------------
# local directory


class LocalStore(Store):
    """A directory. ``uri`` is its absolute path; the SHA-256 of an object is recomputed on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def url(self, key: str) -> str:
        return str(self._path(key))

    def put_file(self, local: str | Path, key: str) -> dict:
        src = _source_file(local)
        digest = _digest_file(src)
        dest = self._path(key)
        if dest.is_file() and dest.stat().st_size == digest.size and _digest_file(dest).sha256 == digest.sha256:
            return _put_result(str(dest), key, digest, uploaded=False)
        _atomic_copy(src, dest, expect_sha256=digest.sha256)
        return _put_result(str(dest), key, digest, uploaded=True)

    def get_file(self, key: str, dest: str | Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise StoreError(f"{src}: no such object in the store {self.uri}")
        dest = Path(dest)
        _atomic_copy(src, dest)  # objects are only ever replaced whole, so any copy is consistent
        return dest

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return _digest_file(path).sha256 if path.is_file() else None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"{path}: cannot delete: {e.strerror or e}") from e
        return True

    def list(self, prefix: str = "") -> list[dict]:
        folder = prefix.rpartition("/")[0]
        start = self._path(folder) if folder else self.root  # _path rejects '..' and friends
        if not start.is_dir():
            return []
        out = []
        for path in start.rglob("*"):
            if path.name.startswith(_TMP_PREFIX) or not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                st = path.stat()
                out.append({"key": key, "size": st.st_size, "modified": st.st_mtime, "etag": None})
        return sorted(out, key=lambda e: e["key"])


# --------------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class _Expected:
    """What the server should report for an object we just uploaded."""

    checksum: str  # base64 SHA-256 (full object) or SHA-256 of the part digests (multipart)
    etag: str  # MD5 hex, or MD5 of the part MD5s + "-N" (multipart)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _stored_sha256(head: dict) -> str | None:
    """The object's SHA-256 hex from its ``sha256`` metadata or a full-object checksum."""
    meta = (head.get("Metadata") or {}).get("sha256", "")
    if _SHA_RE.fullmatch(meta):
        return meta
    checksum, etag = head.get("ChecksumSHA256") or "", head.get("ETag") or ""
    if checksum and "-" not in checksum and "-" not in etag and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        raw = base64.b64decode(checksum)
        if len(raw) == 32:
            return raw.hex()
    return None


def _etag_is_md5(head: dict) -> bool:
    """S3 ETags are (composite) MD5s except for SSE-KMS and SSE-C objects."""
    return (head.get("ServerSideEncryption") in (None, "AES256") and not head.get("SSECustomerAlgorithm")
            and bool(_MD5_ETAG_RE.fullmatch((head.get("ETag") or "").strip('"'))))


def _client_error(e: Any) -> tuple[int, str, str]:
    """(HTTP status, error code, message) of a botocore ClientError."""
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    err = e.response.get("Error", {})
    return status, str(err.get("Code", "")), _one_line(err.get("Message", ""))


def _http_reason(status: int, code: str, message: str) -> str:
    """``HTTP 503 SlowDown: Please reduce your request rate`` (parts that say nothing left out)."""
    text = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
    return text + (f": {message}" if message else "")


def _retryable_exceptions() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    return (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, bx.FlexibleChecksumError,
            ux.HTTPError, builtins.ConnectionError, TimeoutError)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (no URL decoding: S3 keys are taken verbatim)."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri}: not an s3:// URI")
    bucket, _, rest = uri[len("s3://"):].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise StoreError(f"{uri}: invalid bucket name {bucket!r} (3-255 letters, digits, '.', '-', '_')")
    return bucket, rest.strip("/")


class S3Store(Store):
    """A bucket and optional key prefix on S3 or an S3-compatible server (see module docstring).

    ``multipart_threshold``/``part_size`` (bytes) choose multipart uploads (parts of at least
    5 MiB, at most 10,000 of them). ``connect_timeout``/``read_timeout`` (seconds) bound each
    request. ``verify_etag=False`` skips the MD5-ETag comparison after an upload, for servers
    whose ETags are not MD5s (S3 itself: only SSE-KMS/SSE-C objects, which are detected).
    """

    def __init__(self, bucket: str, prefix: str = "", *, retries: int = 4, backoff: float = 0.5,
                 endpoint_url: str | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = PART_SIZE, connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 verify_etag: bool = True) -> None:
        if not _BUCKET_RE.fullmatch(bucket):
            raise StoreError(f"invalid bucket name {bucket!r} (3-255 letters, digits, '.', '-', '_')")
        if retries < 1 or backoff < 0:
            raise StoreError(f"retries must be >= 1 and backoff >= 0 (got {retries}, {backoff})")
        if part_size < MIN_PART_SIZE:
            raise StoreError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum), got {part_size}")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.retries, self.backoff = retries, backoff
        self.endpoint_url = endpoint_url or None
        self.multipart_threshold, self.part_size = multipart_threshold, part_size
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.verify_etag = verify_etag
        self._client: Any = None
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
            custom = (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                      or os.environ.get("AWS_ENDPOINT_URL"))
            options: dict[str, Any] = {"s3": {"addressing_style": "path"}} if custom else {}
            config = Config(connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
                            retries={"total_max_attempts": 1, "mode": "standard"}, **options)
            try:
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
            except Exception as e:  # bad endpoint URL, unknown profile, broken ~/.aws/config
                raise StoreError(f"{self.uri}: cannot create an S3 client: {_one_line(e)}") from e
        return self._client

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _call(self, what: str, key: str | None, fn: Callable[[], T], *,
              on_status: dict[int, Any] | None = None) -> T:
        """Run one request with our bounded retry loop; map failures to one-line StoreErrors.

        ``on_status`` maps HTTP statuses to return values (e.g. ``{404: None}`` for a lookup).
        """
        from botocore import exceptions as bx

        retryable = _retryable_exceptions()
        where = self.url(key) if key else self.uri
        reason = ""
        for attempt in range(self.retries):
            try:
                return fn()
            except bx.ClientError as e:
                status, code, message = _client_error(e)
                if on_status and status in on_status:
                    return on_status[status]
                if not (status >= 500 or status == 429 or code in _RETRYABLE_CODES):
                    raise self._client_failure(what, where, status, code, message) from e
                reason = _http_reason(status, code, message)
            except (bx.NoCredentialsError, bx.PartialCredentialsError) as e:
                raise StoreError(f"{where}: no usable AWS credentials ({_one_line(e)}): set AWS_ACCESS_KEY_ID and "
                                 f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
                                 f"S3-compatible server") from e
            except retryable as e:
                reason = _one_line(e) or type(e).__name__
            except bx.BotoCoreError as e:
                raise StoreError(f"{where}: {what} failed: {_one_line(e)}") from e
            if attempt + 1 < self.retries:
                delay = self.backoff * 2**attempt
                log.warning("%s: %s attempt %d/%d failed (%s); retrying in %.2f s",
                            where, what, attempt + 1, self.retries, reason, delay)
                time.sleep(delay)
        raise StoreUnavailable(f"{where}: {what} failed after {self.retries} attempts: {reason}")

    def _client_failure(self, what: str, where: str, status: int, code: str, message: str) -> StoreError:
        if code == "NoSuchBucket":
            return StoreError(f"bucket '{self.bucket}' does not exist ({where} at {self.endpoint})")
        if status == 403 or code in _DENIED_CODES:
            return StoreError(f"{where}: access denied ({code or status}): check the credentials "
                              f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy")
        if code == "NoSuchKey" or status == 404:
            return StoreError(f"{where}: no such object")
        if status == 412:
            return StoreError(f"{where}: the object changed during the {what}; run again")
        return StoreError(f"{where}: {what} failed: {_http_reason(status, code, message)}")

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

    def _head(self, key: str, what: str = "lookup") -> dict | None:
        """``head_object`` of ``key`` (with checksums), or None if absent (the bucket must exist)."""
        full = self._full(key)
        head = self._call(what, key, lambda: self.client.head_object(Bucket=self.bucket, Key=full,
                                                                    ChecksumMode="ENABLED"),
                          on_status={404: None})
        if head is None:
            self._require_bucket(what)
        return head

    # -- writes ----------------------------------------------------------------------------
    def _part_size_for(self, size: int) -> int:
        return max(self.part_size, -(-size // MAX_PARTS))

    def put_file(self, local: str | Path, key: str) -> dict:
        src = _source_file(local)
        digest = _digest_file(src, md5=True)
        url = self.url(key)
        head = self._head(key, "upload")
        if head is not None and _stored_sha256(head) == digest.sha256 and head.get("ContentLength") == digest.size:
            return _put_result(url, key, digest, uploaded=False)
        if digest.size >= self.multipart_threshold:
            expected = self._put_multipart(src, key, digest)
        else:
            expected = self._put_single(src, key, digest)
        self._verify(key, digest, expected)
        log.info("%s: uploaded %d bytes (sha256 %s)", url, digest.size, digest.sha256[:12])
        return _put_result(url, key, digest, uploaded=True)

    def _put_single(self, src: Path, key: str, digest: _Digest) -> _Expected:
        checksum = _b64(bytes.fromhex(digest.sha256))
        full = self._full(key)

        def attempt() -> dict:
            with open(src, "rb") as body:  # reopened per attempt: every retry sends from byte 0
                return self.client.put_object(Bucket=self.bucket, Key=full, Body=body, ChecksumAlgorithm="SHA256",
                                              ChecksumSHA256=checksum, Metadata={"sha256": digest.sha256})

        self._call("upload", key, attempt)
        return _Expected(checksum=checksum, etag=digest.md5)

    def _put_multipart(self, src: Path, key: str, digest: _Digest) -> _Expected:
        full, part_size = self._full(key), self._part_size_for(digest.size)
        created = self._call("upload", key, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", Metadata={"sha256": digest.sha256}))
        upload_id = created["UploadId"]
        parts: list[dict] = []
        sha_parts, md5_parts, whole = [], [], hashlib.sha256()
        try:
            with open(src, "rb") as f:
                while chunk := f.read(part_size):
                    number = len(parts) + 1
                    whole.update(chunk)
                    sha_parts.append(hashlib.sha256(chunk).digest())
                    md5_parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
                    checksum = _b64(sha_parts[-1])
                    answer = self._call("upload", key, lambda n=number, body=chunk, c=checksum: self.client.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=body,
                        ChecksumAlgorithm="SHA256", ChecksumSHA256=c))
                    parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum})
            if whole.hexdigest() != digest.sha256:
                raise StoreError(f"{src}: the file changed during the upload to {self.url(key)}; nothing was stored")
            # 404 NoSuchUpload: an earlier attempt completed it and its answer was lost; _verify decides
            self._call("upload", key, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}),
                on_status={404: None})
        except BaseException:
            self._abort(key, upload_id)
            raise
        return _Expected(checksum=_b64(hashlib.sha256(b"".join(sha_parts)).digest()),
                         etag=hashlib.md5(b"".join(md5_parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}")

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload so no parts are left behind (logged if even that fails)."""
        try:
            self._call("abort of the multipart upload", key, lambda: self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(key), UploadId=upload_id), on_status={404: None})
        except StoreError as e:
            log.error("%s; multipart upload %s may keep its parts until a lifecycle rule "
                      "(AbortIncompleteMultipartUpload) removes them", e, upload_id)

    def _verify(self, key: str, digest: _Digest, expected: _Expected) -> None:
        """Head the new object and compare it with what was sent; delete it on any mismatch."""
        url = self.url(key)
        head = self._head(key, "upload verification")
        if head is None:
            raise StoreError(f"{url}: upload verification failed: no object after the upload")
        problems = []
        if head.get("ContentLength") != digest.size:
            problems.append(f"size {head.get('ContentLength')} != {digest.size}")
        if (head.get("Metadata") or {}).get("sha256") != digest.sha256:
            problems.append("sha256 metadata differs")
        checksum = (head.get("ChecksumSHA256") or "").split("-")[0]
        if checksum and checksum != expected.checksum:
            problems.append(f"SHA-256 checksum {checksum} != {expected.checksum}")
        etag = (head.get("ETag") or "").strip('"')
        if self.verify_etag and _etag_is_md5(head) and etag != expected.etag:
            problems.append(f"ETag {etag} != MD5 {expected.etag}")
        if not problems:
            return
        try:
            self._call("cleanup", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)))
            fate = "the object was deleted"
        except StoreError as e:
            fate = f"deleting it failed too: {e}"
        raise StoreError(f"{url}: upload verification failed ({'; '.join(problems)}); {fate}")

    def delete(self, key: str) -> bool:
        if not self.exists(key):
            return False
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._full(key)))
        return True

    # -- reads -----------------------------------------------------------------------------
    def get_file(self, key: str, dest: str | Path) -> Path:
        head = self._head(key, "download")
        if head is None:
            raise StoreError(f"{self.url(key)}: no such object")
        return self._download(key, Path(dest), head)

    def _download(self, key: str, dest: Path, head: dict) -> Path:
        """Download the version of ``key`` described by ``head`` to ``dest``, verified and atomically."""
        full, size, want = self._full(key), head.get("ContentLength"), _stored_sha256(head)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{dest.parent}: cannot create: {e.strerror or e}") from e

        def attempt() -> tuple[str, str, int]:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{_TMP_PREFIX}{dest.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    answer = self.client.get_object(Bucket=self.bucket, Key=full, IfMatch=head["ETag"],
                                                    ChecksumMode="ENABLED")
                    sha, n = hashlib.sha256(), 0
                    for chunk in answer["Body"].iter_chunks(_CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        n += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                return tmp, sha.hexdigest(), n
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        try:
            tmp, got, n = self._call("download", key, attempt)
        except OSError as e:  # local disk trouble, not the network (those are retried in _call)
            raise StoreError(f"{dest}: cannot write: {e.strerror or e}") from e
        try:
            if n != size or (want is not None and got != want):
                raise StoreError(f"{self.url(key)}: download verification failed (got {n} bytes, sha256 {got[:12]}; "
                                 f"stored {size} bytes, sha256 {(want or '?')[:12]})")
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    def sha256(self, key: str) -> str | None:
        head = self._head(key)
        return None if head is None else _stored_sha256(head)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def list(self, prefix: str = "") -> list[dict]:
        base = f"{self.prefix}/" if self.prefix else ""

        def attempt() -> list[dict]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + prefix):
                for obj in page.get("Contents", []):
                    out.append({"key": obj["Key"][len(base):], "size": obj["Size"],
                                "modified": obj["LastModified"].timestamp(), "etag": obj["ETag"].strip('"')})
            return out

        return sorted(self._call("list", None, attempt), key=lambda e: e["key"])


# --------------------------------------------------------------------------------------------
# entry points


def _local_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: only local file:// URIs are supported (file:///absolute/path)")
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise StoreError(f"{uri}: unsupported store URI scheme '{parts.scheme}' (use a path, file:// or s3://)")
    return Path(uri)


def open_store(uri: str | None, *, retries: int = 4, backoff: float = 0.5, endpoint_url: str | None = None,
               **s3_options: Any) -> Store:
    """The store at ``uri``: None/"" -> ``runs/store`` under the cwd, a path/``file://`` -> LocalStore,
    ``s3://bucket/prefix`` -> S3Store. ``retries``/``backoff``/``endpoint_url`` and ``s3_options``
    (``multipart_threshold``, ``part_size``, ``connect_timeout``, ``read_timeout``, ``verify_etag``)
    apply to S3 only. Nothing is contacted until the first operation.
    """
    if not uri:
        return LocalStore(DEFAULT_ROOT)
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, retries=retries, backoff=backoff, endpoint_url=endpoint_url, **s3_options)
    return LocalStore(_local_path(uri))


def fetch(uri: str, cache_dir: str | Path, *, retries: int = 4, backoff: float = 0.5,
          endpoint_url: str | None = None) -> Path:
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
    store = S3Store(bucket, retries=retries, backoff=backoff, endpoint_url=endpoint_url)
    head = store._head(key, "download")
    if head is None:
        raise StoreError(f"{uri}: no such object")
    tag = re.sub(r"[^A-Za-z0-9_-]", "", head.get("ETag") or "")[:80] or f"{head.get('ContentLength')}-nohash"
    *dirs, name = key.split("/")
    target = Path(cache_dir).joinpath(bucket, *dirs, f"{name}@{tag}", name)
    if target.is_file() and target.stat().st_size == head.get("ContentLength"):
        return target
    log.info("fetching %s -> %s", uri, target)
    return store._download(key, target, head)


def store_student(store: Store, teacher_fingerprint: str, student_path: str | Path, meta: dict, run: str | None = None) -> dict:
    """Store a sanitized student under ``students/<fingerprint>/[<run>/]`` and its ``meta.json`` last.

    ``run`` (e.g. the audit key) separates audits of one teacher with different params, so a later
    rejected audit never replaces an earlier sanitized student.

    ``meta.json`` (``meta`` plus ``sha256``, ``size``, ``teacher_fingerprint``, ``student_uri``)
    is written only after the student is stored and verified, so its presence means the upload is
    complete. When a different student replaces an earlier one, the old ``meta.json`` is deleted
    first, so a ``meta.json`` never describes a student that is not the stored one.
    Returns ``{"student_uri", "meta_uri", "sha256", "size", "uploaded"}``.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", teacher_fingerprint) or teacher_fingerprint in (".", ".."):
        raise StoreError(f"invalid teacher fingerprint {teacher_fingerprint!r} (letters, digits, '.', '_', '-')")
    if run is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+", run) or run in (".", "..")):
        raise StoreError(f"invalid run name {run!r} (letters, digits, '.', '_', '-')")
    src = _source_file(student_path)
    base = f"students/{teacher_fingerprint}" + (f"/{run}" if run else "")
    student_key, meta_key = f"{base}/student{src.suffix}", f"{base}/meta.json"
    stored = store.sha256(student_key)
    if stored is not None and stored != _digest_file(src).sha256:
        store.delete(meta_key)
    put = store.put_file(src, student_key)
    record = {**meta, "sha256": put["sha256"], "size": put["size"], "teacher_fingerprint": teacher_fingerprint,
              "student_uri": put["uri"], **({"run": run} if run else {})}
    written = store.put_json(record, meta_key)
    return {"student_uri": put["uri"], "meta_uri": written["uri"], "sha256": put["sha256"], "size": put["size"],
            "uploaded": put["uploaded"]}
