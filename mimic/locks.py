"""Inter-process file locks, so concurrent audits of one teacher do the heavy work once.

``fcntl.flock`` locks are released by the kernel when the holder dies (even by SIGKILL), so a
crashed audit never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mimic.errors import MimicError

log = logging.getLogger("mimic")


class LockTimeout(MimicError):
    """Another process held the lock for longer than the timeout."""


@contextlib.contextmanager
def file_lock(path: str | Path, *, timeout: float | None = None, poll: float = 0.2, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Waits (logging once) while another process holds it; ``timeout=None`` waits forever.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.info("waiting for another process working on %s", what or path)
                    announced = True
                if timeout is not None and time.monotonic() - start > timeout:
                    raise LockTimeout(f"{what or path}: still locked by another process after {timeout:g} s") from None
                time.sleep(poll)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
