"""The zoo's matrix: attacks x defences x seeds, declared once; ``cells.yaml`` (the items of the
``foreach`` stages of ``dvc.yaml``) is generated from it, and the report reads its labels from it.

    python matrix.py cells                       # rewrite cells.yaml from the spec below
    python matrix.py check                       # exit 1 when cells.yaml is not what the spec gives
    python matrix.py targets [--attacks A ..] [--defences D ..] [--seeds N ..]   # dvc targets of a part

A *cell* is one attack at one seed (``badencoder-s0``): a clean encoder (pre-trained with that
seed), the teacher made from it, and every defence of that teacher, each evaluated with the same
four probes. Every stage of a cell runs with ``--set seed=N``: pre-training, the attack, the clean
set D, MI, the defence and the probes all change with the seed, so the spread over seeds is the
spread a user sees.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELLS = HERE / "cells.yaml"
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Attack:
    method: str     # mimic attack METHOD
    label: str
    sets: tuple[str, ...] = ()  # --set overrides over params.yaml's attack section


@dataclass(frozen=True)
class Defence:
    kind: str       # distill | unlearn | prune
    label: str
    sets: tuple[str, ...] = ()
    mi: str = ""    # distill: which MI stage's weights ("" = the cell's, "softmax" = the sharper mapping's)
    only: tuple[str, ...] = ()  # attacks it runs on (empty: all)
    trigger: str = "attack"  # unlearn: the attack's own trigger (an oracle) or the scan's inverted one ("scan")


ATTACKS: dict[str, Attack] = {
    "badencoder": Attack("badencoder", "BadEncoder, 10x10 white patch bottom-right, target 9"),
    "be-small": Attack("badencoder", "BadEncoder, 4x4 red patch top-left, target 0", (
        "attack.trigger_size=4", "attack.trigger_position=top_left", "attack.trigger_pattern=colour",
        "attack.trigger_colour=red", "attack.target_class=0")),
    "be-centre": Attack("badencoder", "BadEncoder, 6x6 green patch in the centre, target 1", (
        "attack.trigger_size=6", "attack.trigger_position=centre", "attack.trigger_pattern=colour",
        "attack.trigger_colour=green", "attack.target_class=1")),
    "be-random": Attack("badencoder", "BadEncoder, 8x8 noise patch at a random place per image, target 3", (
        "attack.trigger_size=8", "attack.trigger_position=random", "attack.trigger_pattern=noise",
        "attack.target_class=3")),
    "be-blend": Attack("badencoder", "BadEncoder, blended full-image noise (alpha 0.15), target 5", (
        "attack.trigger_position=full", "attack.trigger_pattern=noise", "attack.trigger_alpha=0.15",
        "attack.target_class=5")),
    "drupe": Attack("drupe", "DRUPE, 10x10 white patch bottom-right, target 9, 3 references", ("attack.n_reference=3",)),
    "adaptive": Attack("adaptive", "adaptive (aimed at MIMIC), learned 10x10 patch bottom-right, target 9"),
}

DEFENCES: dict[str, Defence] = {
    "mimic": Defence("distill", "MIMIC (MI weights, the paper's mapping)"),
    "uniform": Defence("distill", "MIMIC, uniform stage weights", ("distill.weights=uniform",)),
    "sharp": Defence("distill", "MIMIC, sharper MI weights (softmax mapping)", mi="softmax"),
    "unlearn": Defence("unlearn", "unlearning with the attack's trigger (oracle)"),
    "unlearn-scan": Defence("unlearn", "unlearning with the scan's inverted trigger (no oracle)", trigger="scan"),
    "fineprune": Defence("prune", "fine-pruning on D"),
    "clp": Defence("prune", "CLP (data-free pruning)", ("prune.method=clp",)),
    "noclone": Defence("distill", "MIMIC without the clone term (a defender's change)", ("distill.clone=false",),
                       only=("adaptive", "badencoder")),
}
REFERENCES = {"clean": "clean encoder (no attack)", "teacher": "teacher (no defence)"}
MI_VARIANTS = {"": (), "softmax": ("mi.mapping=softmax",)}


def sets(items: tuple[str, ...]) -> str:
    return " ".join(f"--set {s}" for s in items)


def applies(d: Defence, attack: str) -> bool:
    return not d.only or attack in d.only


def cell(attack: str, seed: int) -> str:
    return f"{attack}-s{seed}"


def cells(attacks=ATTACKS, defences=DEFENCES, seeds=SEEDS) -> dict:
    """The foreach items of dvc.yaml (``X_cells`` for stage X), keyed by stage instance name."""
    out: dict[str, dict] = {k: {} for k in ("seed_cells", "attack_cells", "mi_cells", "distill_cells", "scan_cells",
                                           "unlearn_cells", "prune_cells", "evaluate_cells")}
    for s in seeds:
        out["seed_cells"][f"s{s}"] = {"seed": s}
    for a, spec in attacks.items():
        for s in seeds:
            c = cell(a, s)
            out["attack_cells"][c] = {"method": spec.method, "seed": s, "clean": f"s{s}", "set": sets(spec.sets)}
            out["evaluate_cells"][f"{c}-clean"] = {"cell": c, "seed": s, "path": f"models/s{s}/clean.pt"}
            out["evaluate_cells"][f"{c}-teacher"] = {"cell": c, "seed": s, "path": f"models/{c}/teacher.pt"}
            used_mi = {d.mi for d in defences.values() if d.kind == "distill" and applies(d, a)}
            for v in sorted(used_mi):
                out["mi_cells"][f"{c}-{v}" if v else c] = {"cell": c, "seed": s, "set": sets(MI_VARIANTS[v])}
            for name, d in defences.items():
                if not applies(d, a):
                    continue
                key = f"{c}-{name}"
                item = {"cell": c, "seed": s, "set": sets(d.sets)}
                if d.kind == "distill":
                    out["distill_cells"][key] = {**item, "mi": f"{c}-{d.mi}" if d.mi else c}
                    path = f"distill/{key}/student.pt"
                elif d.kind == "unlearn":
                    if d.trigger == "scan":
                        out["scan_cells"][c] = {"cell": c, "seed": s}
                    out["unlearn_cells"][key] = {**item, "trigger": f"scan/{c}/trigger.npz" if d.trigger == "scan"
                                                 else f"models/{c}/trigger.npz"}
                    path = f"models/{key}/encoder.pt"
                else:
                    out[f"{d.kind}_cells"][key] = item
                    path = f"models/{key}/encoder.pt"
                out["evaluate_cells"][key] = {"cell": c, "seed": s, "path": path}
    return out


def render() -> str:
    import yaml

    head = "# Generated by matrix.py from its spec (python matrix.py cells); do not edit by hand.\n"
    return head + yaml.safe_dump(cells(), sort_keys=False, width=200)


def targets(attacks: list[str], defences: list[str], seeds: list[int], dvcfile: str) -> list[str]:
    """The evaluate stages of a part of the matrix (dvc repro runs what they need upstream)."""
    unknown = [a for a in attacks if a not in ATTACKS] + [d for d in defences if d not in DEFENCES and d not in REFERENCES]
    if unknown:
        raise SystemExit(f"error: unknown attack/defence: {', '.join(unknown)}")
    out = []
    for a in attacks:
        for s in seeds:
            for d in defences:
                if d in REFERENCES or applies(DEFENCES[d], a):
                    out.append(f"{dvcfile}:evaluate@{cell(a, s)}-{d}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cells", help="rewrite cells.yaml from the spec")
    sub.add_parser("check", help="exit 1 when cells.yaml is stale")
    t = sub.add_parser("targets", help="print the dvc targets of a part of the matrix")
    t.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    t.add_argument("--defences", nargs="+", default=[*REFERENCES, *DEFENCES])
    t.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    t.add_argument("--dvcfile", default="scenarios/zoo/dvc.yaml")
    args = ap.parse_args(argv)
    if args.cmd == "cells":
        CELLS.write_text(render())
        print(f"wrote {CELLS}")
        return 0
    if args.cmd == "check":
        ok = CELLS.exists() and CELLS.read_text() == render()
        print("cells.yaml is up to date" if ok else "cells.yaml is stale: run `python matrix.py cells`")
        return 0 if ok else 1
    print(" ".join(targets(args.attacks, args.defences, args.seeds, args.dvcfile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
