"""A store in a local directory: writes through :func:`mimic.io.atomic_write`, nothing outside the root."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import IO

from mimic.errors import StoreError
from mimic.io import atomic_write
from mimic.store.base import CHUNK, Digest, Source, Store, digest, put_result
from mimic.store.keys import Listing, Skipped, check_key, key_problem, printable


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LocalStore(Store):
    """A directory. ``uri`` is its absolute path; the SHA-256 of an object is recomputed on demand
    (no sidecar files that could go stale). Keys never lead out of the root, not even through a
    symlink placed inside it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _real_root(self) -> str:
        return os.path.realpath(self.root)

    def _check_inside(self, path: Path, key: str) -> None:
        """Refuse ``path`` if what exists of it resolves outside the root (a symlink inside the store)."""
        existing = path
        while not os.path.lexists(existing) and existing != self.root and existing.parent != existing:
            existing = existing.parent
        if not _within(os.path.realpath(existing), self._real_root()):
            raise StoreError(f"{path}: refused: {key!r} leads outside the store {self.uri} through a symlink")

    def _object(self, key: str) -> Path | None:
        """The file stored under ``key``, or None; StoreError if it resolves outside the root."""
        path = self._path(key)
        if not path.is_file():
            return None
        self._check_inside(path, key)
        return path

    # -- writes ----------------------------------------------------------------------------
    def _put(self, source: Source, key: str) -> dict:
        d = digest(source)
        dest = self._path(key)
        self._check_inside(dest, key)
        if dest.is_file() and dest.stat().st_size == d.size and digest(Source(path=dest)).sha256 == d.sha256:
            return put_result(str(dest), key, d, uploaded=False)
        self._write(source, dest, d)
        return put_result(str(dest), key, d, uploaded=True)

    @staticmethod
    def _write(source: Source, dest: Path, expect: Digest | None = None) -> None:
        """Copy ``source`` to ``dest`` atomically; if the bytes differ from ``expect`` (the source
        changed meanwhile) nothing is written and StoreError is raised."""

        def copy(out: IO[bytes]) -> None:
            sha = hashlib.sha256()
            with source.open() as f:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
            if expect is not None and sha.hexdigest() != expect.sha256:
                raise StoreError(f"{source}: the file changed while it was copied to {dest}; nothing was written")

        try:
            atomic_write(dest, copy)
        except OSError as e:
            raise StoreError(f"{dest}: cannot write: {e.strerror or e}") from e

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()  # a symlink itself is removed, never what it points to
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"{path}: cannot delete: {e.strerror or e}") from e
        return True

    # -- reads -----------------------------------------------------------------------------
    def get_file(self, key: str, dest: str | Path) -> Path:
        src = self._object(key)
        if src is None:
            raise StoreError(f"{self._path(key)}: no such object in the store {self.uri}")
        dest = Path(dest)
        self._write(Source(path=src), dest)  # objects are only ever replaced whole: any copy is consistent
        return dest

    def sha256(self, key: str) -> str | None:
        path = self._object(key)
        return None if path is None else digest(Source(path=path)).sha256

    def exists(self, key: str) -> bool:
        return self._object(key) is not None

    def _scan(self, prefix: str) -> Listing:
        out = Listing()
        folder = prefix.rpartition("/")[0]
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return out
        real_root = self._real_root()
        if not _within(os.path.realpath(start), real_root):
            out.skipped.append(Skipped(folder + "/", "symlink leading outside the store"))
            return out
        for dirpath, dirnames, filenames in os.walk(start):  # symlinked folders are not descended into
            rel = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in sorted(dirnames):
                dkey = base + name
                if not ((dkey + "/").startswith(prefix) or prefix.startswith(dkey + "/")):
                    dirnames.remove(name)  # cannot hold a key under prefix
                    continue
                why = key_problem(dkey)
                if why is None and os.path.islink(os.path.join(dirpath, name)):
                    inside = _within(os.path.realpath(os.path.join(dirpath, name)), real_root)
                    why = "symlinked folder (not followed)" if inside else "symlink leading outside the store"
                if why:
                    dirnames.remove(name)
                    out.skipped.append(Skipped(printable(dkey) + "/", why))
            for name in filenames:
                key = base + name
                if key.startswith(prefix):
                    entry = self._entry(os.path.join(dirpath, name), key, real_root)
                    if isinstance(entry, Skipped):
                        out.skipped.append(entry)
                    else:
                        out.objects.append(entry)
        return out

    @staticmethod
    def _entry(path: str, key: str, real_root: str) -> dict | Skipped:
        why = key_problem(key)
        if why:
            return Skipped(printable(key), why)
        if os.path.islink(path):
            real = os.path.realpath(path)
            if not _within(real, real_root):
                return Skipped(key, "symlink leading outside the store")
            if not os.path.exists(real):
                return Skipped(key, "broken symlink")
        try:
            st = os.stat(path)
        except OSError as e:
            return Skipped(key, f"cannot stat: {e.strerror or e}")
        if not stat.S_ISREG(st.st_mode):
            return Skipped(key, "not a regular file")
        return {"key": key, "size": st.st_size, "modified": st.st_mtime, "etag": None}
