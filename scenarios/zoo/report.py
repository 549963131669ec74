"""Attack-zoo matrix: write docs/results.md (and one CA-vs-ASR plot per attack) from the metrics.

    python report.py write --out ../../docs/results.md --img ../../docs/img/zoo   # the `report` stage
    python report.py write --dir SCENARIO --out results.md --img img              # another scenario folder

``write`` renders ``results.md.j2`` with the facts that ``facts.py`` reads from the files the DVC
stages wrote (whatever part of the matrix has run, including none of it); nothing is typed by hand.
Every file is written atomically (``mimic.io``).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from pathlib import Path

import facts

HERE = facts.HERE
PLOT_PROBES = facts.STANDARD  # the probes the scatter plots show, one panel each


def render(data: dict, img_rel: str, images: dict[str, str]) -> str:
    """The markdown page: ``results.md.j2`` with the facts, the image folder (relative to the page)
    and the image file of each attack."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["f"] = facts.fmt
    env.filters["ms"] = facts.ms
    env.filters["seeds"] = facts.seeds
    text = env.get_template("results.md.j2").render(**data, img_rel=img_rel, images=images)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"  # the template's optional blocks leave blank runs


def colours(names: list[str]) -> dict[str, tuple]:
    """One fixed colour per defence (references included), the same on every attack's plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def plot_attack(attack: str, tables: dict[str, list[dict]], palette: dict[str, tuple]) -> bytes | None:
    """PNG bytes of one attack's CA-vs-ASR scatter: a panel per standard probe, a point per seed,
    one colour per defence (references hollow); None when the attack has no point to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(q, [r for r in tables[q] if r["attack"] == attack and r["n"]]) for q in PLOT_PROBES if q in tables]
    panels = [(q, rows) for q, rows in panels if rows]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (q, rows) in zip(axes[0], panels):
        for r in rows:
            c = palette[r["defence"]]
            ca, asr = [p["ca"] for p in r["points"]], [p["asr"] for p in r["points"]]
            ax.scatter(ca, asr, s=36, label=r["defence"], edgecolors=c,
                       facecolors="none" if r["reference"] else c, linewidths=1.4)
            for p in r["points"]:
                ax.annotate(f"s{p['seed']}", (p["ca"], p["asr"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel("CA (%)")
        ax.set_ylabel("ASR (%)")
        ax.set_title(f"{attack}: {q} probe", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_plots(data: dict, img_dir: Path) -> dict[str, str]:
    """One PNG per attack run into ``img_dir`` (``<attack>.png``); stale plots of attacks without
    metrics are removed. Returns {attack: file name}."""
    from mimic.io import atomic_write

    palette = colours(list(data["defence_labels"]))
    images = {}
    for a in data["attacks"]:
        png = plot_attack(a, data["tables"], palette)
        if png:
            atomic_write(img_dir / f"{a}.png", png)
            images[a] = f"{a}.png"
    for a in facts.matrix.ATTACKS:
        stale = img_dir / f"{a}.png"
        if a not in images and stale.exists():
            stale.unlink()
    return images


def cmd_write(args: argparse.Namespace) -> int:
    """``write``: the page and the plots from the metrics of ``--dir``."""
    from mimic.io import write_text

    root, out, img_dir = Path(args.dir).resolve(), Path(args.out).resolve(), Path(args.img).resolve()
    data = facts.collect(root)
    img_dir.mkdir(parents=True, exist_ok=True)
    images = write_plots(data, img_dir)
    write_text(out, render(data, Path(os.path.relpath(img_dir, out.parent)).as_posix(), images))
    print(f"wrote {out} ({data['n_run']} of {data['n_evaluations']} evaluations, {len(images)} plot(s) in {img_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``write``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="render docs/results.md and the plots from the metrics")
    w.add_argument("--dir", default=str(HERE), help="the scenario folder (default: this script's)")
    w.add_argument("--out", default=str(HERE.parent.parent / "docs" / "results.md"))
    w.add_argument("--img", default=str(HERE.parent.parent / "docs" / "img" / "zoo"))
    args = ap.parse_args(argv)
    return cmd_write(args)


if __name__ == "__main__":
    sys.exit(main())
