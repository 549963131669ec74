"""Versioning the audit's inputs with DVC: the clean data (and a local teacher) go into a DVC cache.

The audit adds each local input file or folder to a DVC repository used as a data registry
(``runs/dvc`` by default, created with ``dvc init --no-scm`` when missing), at
``<kind>/<md5>/<file name>`` with its ``.dvc`` file, through DVC's Python API (``Repo.add``,
``Repo.push``). With a remote (``--dvc-remote s3://bucket/prefix``, or the registry's own default
remote) the objects are pushed. ``results.json`` records, per input, the DVC md5, the path in the
registry and the remote, so a version can be fetched back anywhere::

    dvc.api.open("data/<md5>/clean.npz", repo="runs/dvc", remote="mimic")     # Python
    cd runs/dvc && dvc pull data/<md5>/clean.npz.dvc -r mimic                  # shell

Built-in (``synthetic``) and torchvision data are generated or downloaded by code: their version
is the content hash of the loaded images, and nothing is added. Retries of the push are DVC's
(its S3 client); this task adds none.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefect import task

from mimic.io import copy_file, copy_tree

REMOTE = "mimic"  # the name the registry gives a remote passed on the command line


def dvc_md5(path: str | Path) -> str:
    """The hash ``dvc add`` records for a file (``md5`` of its bytes) or a directory (``.dir`` md5),
    computed with DVC's own hashing (``dvc_data``)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(path).resolve()), fs, "md5")
        return obj.hash_info.value


def local_source(source: str | None) -> Path | None:
    """The local file or folder behind a data source or teacher (None for synthetic/torchvision/S3)."""
    if not source or source == "synthetic" or source.startswith(("torchvision:", "s3://")):
        return None
    p = Path(source)
    return p if p.exists() else None


@contextlib.contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC logs progress at INFO ("Initialized DVC repository", transfer counts): keep it to warnings."""
    lg = logging.getLogger("dvc")
    before = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(before)


def open_registry(root: str | Path, remote_url: str | None = None):
    """The DVC repository at ``root`` (initialised without git when missing); ``remote_url`` is
    configured as the remote ``mimic`` (with ``AWS_ENDPOINT_URL`` as its endpoint when set)."""
    from dvc.repo import Repo

    root = Path(root)
    if not (root / ".dvc").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        try:
            Repo.init(str(root), no_scm=True)
        except Exception as exc:  # noqa: BLE001 - a concurrent audit initialised it first
            if not (root / ".dvc").is_dir():
                raise
            del exc
        with Repo(str(root)) as repo, repo.config.edit() as conf:
            conf["cache"]["type"] = "hardlink,symlink,copy"  # one copy of the bytes, not two
            conf["core"]["analytics"] = False
    repo = Repo(str(root))
    if remote_url:
        with repo.config.edit() as conf:
            settings = {"url": remote_url}
            if remote_url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
                settings["endpointurl"] = os.environ["AWS_ENDPOINT_URL"]
            conf["remote"][REMOTE] = settings
    return repo


def _add(repo, kind: str, path: Path) -> dict:
    md5 = dvc_md5(path)
    rel = Path(kind) / md5.removesuffix(".dir") / path.name
    target = Path(repo.root_dir) / rel
    if not Path(f"{target}.dvc").exists():
        (copy_tree if path.is_dir() else copy_file)(path, target)  # appears complete or not at all
        repo.add(str(target))
    return {"md5": md5, "path": rel.as_posix(), "dvc_file": f"{rel.as_posix()}.dvc"}


@task(name="version-inputs")
def version_inputs(sources: dict[str, str | None], versions: dict[str, str], registry: str,
                   remote_url: str | None = None) -> dict:
    """``{kind: {"md5", "path", "dvc_file", "repo", "remote", "pushed"} | None}`` for ``sources``
    (``kind`` -> source; None when it is not a local file). ``versions``: the loaded data's content
    hash per kind, the fallback version. Also ``"data_version"``: ``md5:<md5>`` of the clean data,
    or ``<kind>:<content hash>``."""
    local = {k: local_source(s) for k, s in sources.items()}
    out: dict = {k: None for k in sources}
    with _quiet_dvc():
        _version(local, out, registry, remote_url)
    clean = out.get("data")
    src = sources.get("data") or ""
    out["data_version"] = f"md5:{clean['md5']}" if clean else f"{src.split(':')[0]}:{versions.get('data', '')}"
    return out


def _version(local: dict[str, Path | None], out: dict, registry: str, remote_url: str | None) -> None:
    if any(local.values()):
        repo = open_registry(registry, remote_url)
        try:
            remote = REMOTE if remote_url else (repo.config["core"].get("remote") or None)
            url = repo.config["remote"][remote]["url"] if remote else None
            for kind, path in local.items():
                if path is not None:
                    out[kind] = {**_add(repo, kind, path), "repo": str(Path(repo.root_dir).resolve()), "remote": url,
                                 "remote_name": remote, "pushed": False}
            if remote:
                targets = [str(Path(repo.root_dir) / v["dvc_file"]) for v in out.values() if v]
                repo.push(targets=targets, remote=remote)
                for v in out.values():
                    if v:
                        v["pushed"] = True
        finally:
            repo.close()
