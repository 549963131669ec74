"""One iterative walk over plain containers (no recursion: depth and cycles are reported, not hit)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from mimic.checkpoints.messages import printable

CONTAINERS = (Mapping, list, tuple, set, frozenset)


class WalkError(ValueError):
    """The structure nests deeper than allowed or contains itself."""


def _short(where: str) -> str:
    where = where.lstrip(".")
    return where if len(where) <= 60 else where[:57] + "..."


def _children(obj: Any, where: str) -> Iterator[tuple[str, Any, bool]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield where, key, True
            yield f"{where}.{printable(str(key), 60)}", value, False
    else:
        for i, value in enumerate(obj):
            yield f"{where}[{i}]", value, False


def walk(obj: Any, root: str, max_depth: int) -> Iterator[tuple[str, Any, bool]]:
    """Yield ``(where, value, is_key)`` for every non-container value and every mapping key.

    ``where`` reads like ``meta.history[3].loss``. Containers shared by several parents are walked
    once; a container inside itself, or nesting deeper than ``max_depth``, raises WalkError.
    """
    if not isinstance(obj, CONTAINERS):
        yield root, obj, False
        return
    on_path: set[int] = {id(obj)}
    done: set[int] = set()
    path: list[tuple[Any, Iterator[tuple[str, Any, bool]]]] = [(obj, _children(obj, root))]
    while path:
        container, children = path[-1]
        item = next(children, None)
        if item is None:
            path.pop()
            on_path.discard(id(container))
            done.add(id(container))
            continue
        where, value, is_key = item
        if not isinstance(value, CONTAINERS):
            yield where, value, is_key
            continue
        if id(value) in on_path:
            raise WalkError(f"{_short(where) or 'the top level'} contains itself (a cyclic structure)")
        if id(value) in done:
            continue
        if len(path) >= max_depth:
            raise WalkError(f"{_short(where)} nests deeper than {max_depth} levels")
        on_path.add(id(value))
        path.append((value, _children(value, where)))
