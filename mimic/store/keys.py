"""Store keys: one rule for both backends, applied to every key we write and every key we list.

A good key is a relative ``a/b/c`` path of UTF-8 text: no empty, ``.`` or ``..`` segment, no
leading or trailing ``/``, no backslash, no control character (a newline in a name would forge
lines in logs and listings), no segment starting with mimic's temporary prefix
(:data:`mimic.io.TMP_PREFIX`: an unfinished write) and at most 1024 bytes (S3's limit).

:func:`key_problem` says what is wrong with a key (or None); :func:`check_key` raises it as a
one-line :class:`StoreError`. Listings use :func:`key_problem` to skip odd keys one by one (a
:class:`Listing` keeps them, each with its reason), so one odd key never hides the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from mimic.errors import StoreError
from mimic.io import TMP_PREFIX

MAX_KEY_BYTES = 1024  # S3's limit for a key (prefix included)


def _is_control(ch: str) -> bool:
    """C0/C1 control characters and the Unicode line/paragraph separators."""
    o = ord(ch)
    return o < 0x20 or 0x7F <= o < 0xA0 or o in (0x2028, 0x2029)


def key_problem(key: object) -> str | None:
    """Why ``key`` is not a good store key, or None when it is one."""
    if not isinstance(key, str) or not key:
        return "empty key"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in key):
        return "name is not valid UTF-8"
    if any(_is_control(c) for c in key):
        return "control character (newline, tab, escape...) in the name"
    if "\\" in key:
        return "backslash in the name"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/"):
        return "absolute key (leading '/')"
    if key.endswith("/"):
        return "folder marker (trailing '/')"
    parts = key.split("/")
    if "" in parts:
        return "empty path segment ('//')"
    if ".." in parts:
        return "'..' path segment"
    if "." in parts:
        return "'.' path segment"
    if any(p.startswith(TMP_PREFIX) for p in parts):
        return f"temporary name (mimic's '{TMP_PREFIX}' prefix: an unfinished write)"
    return None


def check_key(key: str) -> str:
    """Return ``key`` if it is a good relative store key (``a/b/c``), else raise StoreError."""
    problem = key_problem(key)
    if problem:
        raise StoreError(f"invalid store key {key!r}: {problem}; use a relative 'a/b/c' key")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if some good key can start with it ("" lists everything), else raise StoreError."""
    if prefix and key_problem(prefix + "x"):
        raise StoreError(f"invalid store key prefix {prefix!r}: {key_problem(prefix + 'x')}")
    return prefix


def printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 (surrogate escapes from the filesystem) as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Skipped(NamedTuple):
    """A listed key that is not a good store key (or not a usable object), with the reason."""

    key: str
    reason: str


@dataclass
class Listing:
    """What :meth:`Store.scan` found: good objects and, each on its own, the keys it skipped.

    ``objects``: ``{"key", "size", "modified" (POSIX seconds), "etag" (S3) or None (local)}``,
    sorted by key. ``skipped``: :class:`Skipped` ``(key, reason)`` pairs, sorted by key. Print a
    skipped key with ``{key!r}``: it may hold control characters.
    """

    objects: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def sort(self) -> Listing:
        self.objects.sort(key=lambda e: e["key"])
        self.skipped.sort()
        return self
