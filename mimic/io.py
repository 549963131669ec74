"""Atomic file writes: the one place mimic writes a file (or copies a folder) that someone else may read.

Every writer goes through :func:`atomic_write`: the content goes to a uniquely named temporary
file in the target's directory (so concurrent writers never collide), is flushed and fsynced,
then renamed over the target (``os.replace`` is atomic on POSIX), and the directory is fsynced so
the rename survives a crash. A reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".mimic-tmp-"  # temporary files of an unfinished write (listings skip them)


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename durable; not possible on every platform / filesystem
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object] | bytes) -> Path:
    """Write ``path`` atomically: ``write(fileobj)`` (or the given bytes) to a unique temp file, fsync, rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(write, (bytes, bytearray, memoryview)):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


def json_bytes(obj: Any, *, indent: int | None = 2) -> bytes:
    """``obj`` as UTF-8 JSON text ending in a newline (NaN/Infinity are refused: they are not JSON)."""
    return (json.dumps(obj, indent=indent, allow_nan=False, default=_plain) + "\n").encode()


def _plain(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON."""
    return atomic_write(path, json_bytes(obj, indent=indent))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8)."""
    return atomic_write(path, text.encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file (``OSError`` / ``ValueError`` propagate; callers decide what a bad file means)."""
    return json.loads(Path(path).read_text())


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Atomically copy ``src`` to ``dst`` (the destination appears complete or not at all)."""
    import shutil

    with open(src, "rb") as f:
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Atomically copy the folder ``src`` to ``dst``: into a unique temporary folder beside ``dst``, then
    renamed into place (the folder appears complete or not at all; an existing non-empty ``dst`` is an
    ``OSError``)."""
    import shutil

    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)  # also copies src's mode over mkdtemp's 0700
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target
