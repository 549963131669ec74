"""The store interface and what both backends share (sources, digests, results)."""

from __future__ import annotations

import abc
import base64
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mimic.errors import StoreError
from mimic.store.keys import Listing, check_prefix

MIB = 1 << 20
CHUNK = MIB  # read size for hashing and copying


def one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Source:
    """What a put sends: a local file or bytes in memory (``put_json``)."""

    path: Path | None = None
    data: bytes | None = None

    @classmethod
    def file(cls, local: str | Path) -> Source:
        path = Path(local)
        if not path.is_file():
            raise StoreError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        return cls(path=path)

    def open(self) -> IO[bytes]:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read: {e.strerror or e}") from e

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path is not None
        try:
            return self.path.stat().st_size
        except OSError as e:
            raise StoreError(f"{self.path}: cannot read: {e.strerror or e}") from e

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else "<data>"


@dataclass(frozen=True)
class Digest:
    """SHA-256 (hex) and size of a source; for S3 also what the server should report back.

    ``checksum``: base64 SHA-256 of the object (single PUT) or of the part digests (multipart);
    ``etag``: MD5 hex, or MD5 of the part MD5s + ``-N`` (multipart). Empty when not computed.
    """

    sha256: str
    size: int
    checksum: str = ""
    etag: str = ""


def digest(source: Source, part_size: int | None = None) -> Digest:
    """Hash ``source`` in one pass: SHA-256 and size; with ``part_size`` also the S3 checksum and
    ETag a multipart upload in parts of ``part_size`` bytes produces; with ``part_size=0`` those
    of a single PUT."""
    sha, size = hashlib.sha256(), 0
    parts_sha: list[bytes] = []
    parts_md5: list[bytes] = []
    whole_md5 = hashlib.md5(usedforsecurity=False)
    step = part_size or CHUNK
    try:
        with source.open() as f:
            while block := f.read(step):
                sha.update(block)
                size += len(block)
                if part_size:
                    parts_sha.append(hashlib.sha256(block).digest())
                    parts_md5.append(hashlib.md5(block, usedforsecurity=False).digest())
                elif part_size == 0:
                    whole_md5.update(block)
    except OSError as e:
        raise StoreError(f"{source}: cannot read: {e.strerror or e}") from e
    if part_size is None:
        return Digest(sha.hexdigest(), size)
    if part_size == 0:
        return Digest(sha.hexdigest(), size, base64.b64encode(sha.digest()).decode(), whole_md5.hexdigest())
    composite = hashlib.sha256(b"".join(parts_sha)).digest()
    etag = hashlib.md5(b"".join(parts_md5), usedforsecurity=False).hexdigest() + f"-{len(parts_md5)}"
    return Digest(sha.hexdigest(), size, base64.b64encode(composite).decode(), etag)


def put_result(uri: str, key: str, d: Digest, uploaded: bool, version_id: str | None = None) -> dict:
    return {"uri": uri, "key": key, "sha256": d.sha256, "size": d.size, "uploaded": uploaded,
            "version_id": version_id}


def json_bytes(obj: dict) -> bytes:
    """Deterministic JSON (sorted keys, non-JSON values via ``str``): an unchanged dict is an unchanged object."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


class Store(abc.ABC):
    """A flat namespace of immutable-by-content objects under a root URI (see :mod:`mimic.store`)."""

    uri: str

    @abc.abstractmethod
    def url(self, key: str) -> str:
        """The full URI of ``key``: an absolute path (local) or ``s3://bucket/prefix/key``."""

    @abc.abstractmethod
    def _put(self, source: Source, key: str) -> dict:
        """Store ``source`` under ``key`` (verified, atomic, skipped when already there)."""

    def put_file(self, local: str | Path, key: str) -> dict:
        """Store a file under ``key``, verified and atomically; skip it if already there.

        Returns ``{"uri", "key", "sha256", "size", "uploaded", "version_id"}``; ``uploaded`` is
        False when an object with the same SHA-256 and size was already stored; ``version_id`` is
        the S3 VersionId on a versioned bucket, else None.
        """
        return self._put(Source.file(local), key)

    def put_json(self, obj: dict, key: str) -> dict:
        """Store ``obj`` as indented JSON with sorted keys (non-JSON values via ``str``); as put_file."""
        return self._put(Source(data=json_bytes(obj)), key)

    @abc.abstractmethod
    def get_file(self, key: str, dest: str | Path) -> Path:
        """Copy the object ``key`` to ``dest`` (verified; through :func:`mimic.io.atomic_write`); return ``dest``."""

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
    def _scan(self, prefix: str) -> Listing:
        """Every key under ``prefix`` (already checked), sorted into good objects and skipped ones."""

    def scan(self, prefix: str = "") -> Listing:
        """Objects whose key starts with ``prefix`` (a plain string prefix), each key judged on its own.

        Good keys become ``Listing.objects``; odd ones (``a//b``, ``../x``, ``./x``, ``a\\b``, a
        temporary name, control characters, symlinks out of a local root, non-files) go to
        ``Listing.skipped`` with the reason, and never fail the listing. An invalid ``prefix``
        raises StoreError.
        """
        return self._scan(check_prefix(prefix)).sort()

    def list(self, prefix: str = "") -> list[dict]:
        """The good objects of :meth:`scan`: ``[{"key", "size", "modified", "etag"}]`` sorted by key."""
        return self.scan(prefix).objects

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
