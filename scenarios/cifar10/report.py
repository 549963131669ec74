"""CIFAR-10 reference scenario: stamp stage records, and write docs/results.md from the metrics.

    python report.py stamp FILE --params params.yaml --profile cpu   # add the environment to a JSON record
    python report.py write --out ../../docs/results.md --img ../../docs/img/cifar10

Every number in docs/results.md is read from the JSON files the DVC stages wrote (metrics/*.json,
records/*.json, mi/*/mi.json); nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cmd_stamp(args: argparse.Namespace) -> None:
    """Add ``environment`` (device, threads, torch) to a JSON record that lacks it."""
    from mimic.config import load_config
    from mimic.pipeline import git_revision, write_json
    from mimic.runtime import environment, resolve_device

    cfg = load_config(args.params, args.profile)
    path = Path(args.file)
    rec = json.loads(path.read_text())
    if "environment" not in rec:
        rec["environment"] = {**environment(resolve_device(cfg.device)), "seed": cfg.seed, "git": git_revision()}
        write_json(path, rec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp")
    s.add_argument("file")
    s.add_argument("--params")
    s.add_argument("--profile")
    s.add_argument("--quiet", action="store_true")
    w = sub.add_parser("write")
    w.add_argument("--out", default=str(HERE.parent.parent / "docs" / "results.md"))
    w.add_argument("--img", default=str(HERE.parent.parent / "docs" / "img" / "cifar10"))
    args = ap.parse_args(argv)
    if args.cmd == "stamp":
        cmd_stamp(args)
    else:
        cmd_write(args)
    return 0


def cmd_write(args: argparse.Namespace) -> None:
    raise SystemExit("not yet")


if __name__ == "__main__":
    sys.exit(main())
