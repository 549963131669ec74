"""One-line refusals: every problem with a model file is a CheckpointError ``"<file>: <message>"``."""

from __future__ import annotations

from collections.abc import Iterable

from mimic.errors import CheckpointError


def fail(source: str, message: str) -> CheckpointError:
    """A one-line CheckpointError ``"<source>: <message>"`` (newlines and runs of spaces collapsed)."""
    text = f"{source}: {message}"
    return CheckpointError(" ".join(text.split()))


def over_limit(source: str, what: str, value: int | float, name: str, bound: int | float) -> CheckpointError:
    """A refusal naming the :class:`~mimic.checkpoints.limits.Limits` field that was exceeded."""
    return fail(source, f"refused: {what} ({value}) exceeds limit {name}={bound}")


def names(keys: Iterable[object], limit: int = 5) -> str:
    """``a, b, c (and 7 more)``; every name printed as a plain string with control characters escaped."""
    shown, total = [], 0
    for key in keys:
        total += 1
        if len(shown) < limit:
            shown.append(printable(str(key)))
    text = ", ".join(shown)
    return text + (f" (and {total - limit} more)" if total > limit else "")


def printable(text: str, width: int = 80) -> str:
    """``text`` with non-printable characters escaped and cut to ``width`` (safe for one log line)."""
    out = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return out if len(out) <= width else out[: width - 3] + "..."


def code_refusal(source: str, bad: Iterable[str]) -> CheckpointError:
    return fail(
        source,
        f"refused: the file contains pickled code (global {names(sorted(set(bad)), 3)}); "
        "only tensors and plain data are loaded",
    )
