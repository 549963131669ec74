"""Generated blocks in the docs: the text between two HTML-comment markers, rewritten by a benchmark."""

from __future__ import annotations

from pathlib import Path

from mimic.io import write_text


def replace_block(path: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` between the ``begin``/``end`` markers of ``path`` (which must hold both), atomically."""
    doc = Path(path).read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} block to replace")
    head, rest = doc.split(begin, 1)
    write_text(path, f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}")
