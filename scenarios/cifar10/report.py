"""CIFAR-10 reference scenario: write docs/cifar10.md from the metrics, and check a rerun.

    python report.py write --out ../../docs/cifar10.md --img ../../docs/img/cifar10
    python report.py compare --rev HEAD --tol 1 --json compare.json   # a rerun vs the committed numbers

``write`` renders ``results.md.j2`` with the facts that ``facts.py`` reads from the files the DVC
stages wrote; nothing is typed by hand. ``compare`` asks ``dvc metrics diff`` for every CA/ASR that
changed between a git revision and the working tree, and compares the weight fingerprints that
the stage records name (equal fingerprints: bit-identical models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import facts

HERE = facts.HERE


def render(data: dict, img_rel: str, images: list[str]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["f"] = facts.fmt
    env.filters["dur"] = facts.dur
    return env.get_template("results.md.j2").render(**data, img_rel=img_rel, images=images)


def cmd_write(args: argparse.Namespace) -> int:
    out, img_dir = Path(args.out).resolve(), Path(args.img).resolve()
    img_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for src, dst in facts.IMAGES:
        if (HERE / src).exists():
            shutil.copyfile(HERE / src, img_dir / dst)
            images.append(dst)
    data = facts.collect()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, os.path.relpath(img_dir, out.parent), images))
    print(f"wrote {out} ({len(data['rows'])} encoders)")
    return 0


# ---------------------------------------------------------------------------------------------
# compare: does a rerun (e.g. `dvc repro` in a fresh clone) reproduce the committed numbers?


class CompareError(Exception):
    """A one-line reason the comparison could not run."""


def _git(root: Path, *args: str) -> str | None:
    r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def metrics_diff(root: Path, rev: str) -> dict[str, dict]:
    """``dvc metrics diff REV --all --json`` run in ``root``: {file: {key: {old, new, diff}}}."""
    r = subprocess.run([sys.executable, "-m", "dvc", "metrics", "diff", rev, "--all", "--json"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        raise CompareError(f"dvc metrics diff {rev} failed in {root}: {lines[-1] if lines else f'exit {r.returncode}'}")
    try:
        return json.loads(r.stdout or "{}")
    except ValueError:
        raise CompareError(f"dvc metrics diff {rev}: output is not JSON") from None


def ca_asr_rows(diff: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """The CA/ASR entries of a metrics diff (keys ``encoders.<name>.<probe>.<ca|asr>``); seconds and
    environment fields are not results and are left out. Files absent on one side are 'missing'."""
    rows, missing = [], set()
    for file, entries in sorted(diff.items()):
        for key, v in sorted(entries.items()):
            parts = key.split(".")
            if len(parts) != 4 or parts[0] != "encoders" or parts[3] not in ("ca", "asr"):
                continue
            old, new = v.get("old"), v.get("new")
            if old is None or new is None:  # a whole file, or one probe of it (a protocol added or dropped)
                side = "not at the revision" if old is None else "not in the working tree"
                whole = all((e.get("old") if old is None else e.get("new")) is None for e in entries.values())
                missing.add(f"{file} {side}" if whole else f"{file}: probe {parts[1]} {parts[2]} {side}")
            rows.append({"encoder": parts[1], "probe": parts[2], "metric": parts[3], "ref": old, "now": new,
                         "delta": None if old is None or new is None else round(new - old, 2)})
    return rows, sorted(missing)


def weight_fingerprints(texts: list[str | None]) -> dict[str, str]:
    """Weight fingerprint of every model a stage record names (``path`` + ``fingerprint``: the
    content hash of the weights, mimic.fingerprint), by model path; not the file's md5, since a
    checkpoint also holds metadata that may change while the weights do not."""
    out = {}
    for text in texts:
        try:
            rec = json.loads(text) if text else None
        except ValueError:
            continue
        if isinstance(rec, dict) and str(rec.get("path", "")).endswith(".pt") and rec.get("fingerprint"):
            out[rec["path"]] = rec["fingerprint"]
    return out


def compare(root: Path, rev: str, tol: float) -> dict:
    if _git(root, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}") is None:
        raise CompareError(f"{rev!r} is not a git revision of {root}")
    rows, missing = ca_asr_rows(metrics_diff(root, rev))
    if not rows and not missing:
        missing.append(f"no CA/ASR metrics in {root} or at {rev}")
    names = [Path(n).name for n in (_git(root, "ls-tree", "--name-only", rev, "./records/") or "").splitlines()]
    names = [n for n in names if n.endswith(".json") and not n.startswith("reproduction")]
    ref = weight_fingerprints([_git(root, "show", f"{rev}:./records/{n}") for n in names])
    now = weight_fingerprints([(root / "records" / n).read_text() for n in names if (root / "records" / n).is_file()])
    models = {p: {"ref": ref[p], "now": now.get(p), "identical": ref[p] == now.get(p)} for p in sorted(ref)}
    deltas = [abs(r["delta"]) for r in rows if r["delta"] is not None]
    bad = [r for r in rows if r["delta"] is None or abs(r["delta"]) > tol]
    return {"rev": rev, "commit": (_git(root, "rev-parse", rev) or rev).strip(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "tolerance": tol, "rows": rows,
            "missing": missing, "max_abs_delta": max(deltas, default=None), "outside_tolerance": len(bad),
            "models": models, "models_identical": sum(m["identical"] for m in models.values()),
            "reproduced": not bad and not missing}


def cmd_compare(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    try:
        res = compare(root, args.rev, args.tol)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.note:
        res["note"] = args.note
    print(f"{'encoder':<16}{'probe':<8}{'metric':<7}{'ref':>7}{'now':>7}{'delta':>7}")
    for r in res["rows"]:
        flag = "" if r["delta"] is not None and abs(r["delta"]) <= args.tol else "  <-- outside"
        print(f"{r['encoder']:<16}{r['probe']:<8}{r['metric']:<7}{facts.fmt(r['ref'], 2):>7}{facts.fmt(r['now'], 2):>7}"
              f"{facts.fmt(r['delta'], 2):>7}{flag}")
    for m in res["missing"]:
        print(f"missing: {m}")
    print(f"models with weights bit-identical to {args.rev}: {res['models_identical']} of {len(res['models'])}")
    print(f"{'reproduced' if res['reproduced'] else 'NOT reproduced'}: max |delta| {facts.fmt(res['max_abs_delta'], 2)} "
          f"points, tolerance {args.tol:g}, {res['outside_tolerance']} value(s) outside, {len(res['missing'])} missing")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["reproduced"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="render docs/cifar10.md from the metrics")
    w.add_argument("--out", default=str(HERE.parent.parent / "docs" / "cifar10.md"))
    w.add_argument("--img", default=str(HERE.parent.parent / "docs" / "img" / "cifar10"))
    c = sub.add_parser("compare", help="compare the metrics in the working tree (a rerun) with those at a git revision")
    c.add_argument("--rev", default="HEAD", help="the revision holding the reference numbers (default HEAD)")
    c.add_argument("--tol", type=float, default=1.0, help="largest allowed |difference| in points (default 1)")
    c.add_argument("--dir", default=str(HERE), help="the scenario folder (default: this script's)")
    c.add_argument("--json", help="also write the comparison here")
    c.add_argument("--note", help="a sentence recorded with the comparison (shown in docs/cifar10.md)")
    args = ap.parse_args(argv)
    return cmd_compare(args) if args.cmd == "compare" else cmd_write(args)


if __name__ == "__main__":
    sys.exit(main())
