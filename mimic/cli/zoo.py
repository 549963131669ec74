"""The attack zoo's stage commands: ``mimic attack badencoder|drupe|adaptive`` (make a backdoored
teacher from a clean encoder) and ``mimic defend unlearn|prune`` (the baseline defences MIMIC is
compared with). Each runs one cached stage and, like every stage command, reports its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mimic.cli import add_command, common, say
from mimic.errors import DataError

ATTACKS = {
    "badencoder": "BadEncoder (Jia et al. 2022): triggered images -> the reference features",
    "drupe": "DRUPE (Tao et al. 2024): BadEncoder with the triggered feature distribution kept clean-like",
    "adaptive": "aimed at MIMIC: the trigger is learned against a shadow MIMIC student",
}
DEFENCES = {
    "unlearn": "unlearning: fine-tune on the clean set so stamped images keep their clean features",
    "prune": "pruning: fine-pruning on the clean set (prune.method=fineprune) or data-free CLP (clp)",
}


def _plan_attack(method: str):
    if method == "drupe":
        from mimic.stages.drupe import plan_drupe

        return plan_drupe
    if method == "adaptive":
        from mimic.stages.adaptive import plan_adaptive

        return plan_adaptive
    from mimic.stages.attack import plan_attack

    return plan_attack


def cmd_attack(args: argparse.Namespace) -> dict:
    from mimic.cli.commands import _summary, cache_of, config, run_stage
    from mimic.inputs import load_data, load_teacher
    from mimic.io import copy_file

    cfg = config(args)
    plan = _plan_attack(args.attack)
    run = run_stage(cfg, plan(cfg, load_teacher(args.clean), load_data(cfg), progress=not args.quiet), cache_of(args))
    copy_file(run.path("encoder"), args.out)
    if args.trigger_out:
        copy_file(run.path("trigger"), args.trigger_out)
    say(args, f"backdoored encoder ({args.attack}): {args.out} ({run.manifest['fingerprint'][:12]}), "
              f"target class {cfg.attack.target_class}")
    return {"path": args.out, **_summary(run)}


def load_trigger(path: str, limits: Any):
    """A trigger NPZ (BadEncoder's layout, or the scan's trigger.npz), or a checkpoint that carries one."""
    from mimic.inputs import load_trigger as lookup

    trigger, _ = lookup(path, checkpoints=limits)
    if trigger is None:
        raise DataError(f"{path}: carries no trigger; pass a trigger NPZ (e.g. the scan's trigger.npz)")
    return trigger


def cmd_defend(args: argparse.Namespace) -> dict:
    from mimic.cli.commands import _clean, _summary, cache_of, config, run_stage
    from mimic.inputs import admit_teacher
    from mimic.io import copy_file

    cfg = config(args)
    clean, ver, data = _clean(args, cfg)
    t = admit_teacher(args.teacher, cfg.limits)
    if args.defence == "unlearn":
        from mimic.stages.unlearn import plan_unlearn

        plan = plan_unlearn(cfg, t.loaded, t.fingerprint, clean, ver, load_trigger(args.trigger, cfg.limits),
                            progress=not args.quiet)
        what = "unlearned"
    else:
        from mimic.stages.prune import plan_prune

        plan = plan_prune(cfg, t.loaded, t.fingerprint, clean, ver, progress=not args.quiet)
        what = f"pruned ({cfg.prune.method})"
    run = run_stage(cfg, plan, cache_of(args))
    copy_file(run.path("encoder"), args.out)
    say(args, f"{what} encoder: {args.out} ({run.manifest['fingerprint'][:12]})")
    return {"path": args.out, "teacher": t.info(), "data": data, **_summary(run)}


def register(sub: Any) -> None:
    from mimic.cli.commands import DATA_HELP, cache_arg

    p = add_command(sub, "attack", cmd_attack, help="make a backdoored encoder (the attack zoo: tests, demos, scenarios)")
    asub = p.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    for name, text in ATTACKS.items():
        b = asub.add_parser(name, help=text, description=text)
        b.add_argument("--clean", required=True, metavar="PATH", help="the clean encoder to backdoor")
        b.add_argument("--data", metavar="SRC", help=DATA_HELP + " (labelled: references and shadow images)")
        b.add_argument("--out", required=True, metavar="PATH", help="where to write the backdoored encoder")
        b.add_argument("--trigger-out", metavar="NPZ", help="also write the trigger in BadEncoder's NPZ layout")
        cache_arg(b)
        common(b)

    p = add_command(sub, "defend", cmd_defend, help="a baseline defence on the clean set D (unlearning, pruning)")
    dsub = p.add_subparsers(dest="defence", required=True, metavar="DEFENCE")
    for name, text in DEFENCES.items():
        d = dsub.add_parser(name, help=text, description=text)
        d.add_argument("--teacher", required=True, metavar="PATH", help="the encoder to defend")
        d.add_argument("--data", metavar="SRC", help=DATA_HELP + " (the clean set D: data.clean_size stratified images)")
        if name == "unlearn":
            d.add_argument("--trigger", required=True, metavar="NPZ|PT",
                           help="the trigger to unlearn: the scan's inverted trigger.npz, a trigger NPZ, or a "
                                "checkpoint that carries one (the attack's own trigger: an oracle upper bound)")
        d.add_argument("--out", required=True, metavar="PATH", help="where to write the defended encoder")
        cache_arg(d)
        common(d)
