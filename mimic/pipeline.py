"""The stages of an audit as functions of files: params + paths in, files + plain dicts out.

The CLI, ``dvc repro`` and the Prefect tasks all call these; nothing here imports an
orchestrator. Each stage reuses its output when the file already exists with the same input key
(stored in the file's metadata) and resumes its training loop from the work directory otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mimic.checkpoints import LoadedEncoder, load_encoder, save_encoder
from mimic.config import Config
from mimic.data import Dataset, ImageSet, content_hash, load_dataset, stratified_indices
from mimic.encoders import EncoderSpec
from mimic.errors import CheckpointError, DataError
from mimic.fingerprint import fingerprint_encoder
from mimic.runtime import autocast_dtype, environment, resolve_device
from mimic.triggers import Trigger, white_patch

log = logging.getLogger("mimic")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str | Path, obj: dict) -> None:
    """Atomically write ``obj`` as JSON (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _existing(path: Path, key: str) -> LoadedEncoder | None:
    """The encoder at ``path`` if it was produced with ``key`` (a finished stage), else None."""
    if not path.exists():
        return None
    try:
        loaded = load_encoder(path)
    except CheckpointError:
        return None
    return loaded if loaded.meta.get("key") == key else None


@dataclass
class Runtime:
    device: torch.device
    amp: torch.dtype | None

    @classmethod
    def from_config(cls, cfg: Config) -> "Runtime":
        device = resolve_device(cfg.device)
        return cls(device, autocast_dtype(device, cfg.precision))


def load_data(cfg: Config, source: str | None = None) -> Dataset:
    src = source or cfg.data.source
    ds = load_dataset(src, synthetic_train=cfg.data.synthetic_train, synthetic_test=cfg.data.synthetic_test, seed=cfg.seed)
    if ds.skipped:
        log.warning("%s: skipped %d unreadable image(s)", src, ds.skipped)
    return ds


def clean_subset(cfg: Config, ds: Dataset) -> ImageSet:
    """The defender's clean set D: ``data.clean_size`` stratified images of the training split."""
    n = len(ds.train)
    if n <= cfg.data.clean_size:
        return ds.train
    idx = stratified_indices(n, ds.train.y, cfg.data.clean_size, cfg.seed)
    return ds.train.subset(idx)


def labelled_train(cfg: Config, ds: Dataset) -> ImageSet:
    size = cfg.evaluate.train_size
    if size <= 0 or size >= len(ds.train):
        return ds.train
    return ds.train.subset(stratified_indices(len(ds.train), ds.train.y, size, cfg.seed + 1))


# ---------------------------------------------------------------------------------------------
# Stages


def stage_pretrain(
    cfg: Config, out: Path, work: Path, *, data: Dataset | None = None, progress: bool = True,
    init: Path | None = None, clean: bool = False,
) -> dict:
    """SimCLR encoder -> ``out``: a clean encoder from scratch, or a fine-tuned one.

    ``init``: start from this encoder file's weights (its architecture, not ``cfg.encoder``; its
    fingerprint enters the cache key). ``clean``: train on the defender's clean set D
    (``data.clean_size`` stratified images, the same D as distillation) instead of the training
    split / ``pretrain.train_size``. Together they are the SimCLR fine-tuning baseline.
    """
    from mimic.ssl import pretrain_simclr

    ds = data or load_data(cfg)
    start = load_encoder(init) if init is not None else None
    spec = start.spec if start is not None else EncoderSpec(cfg.encoder.arch, cfg.encoder.width)
    if clean:
        images = clean_subset(cfg, ds)
        subset = ("clean", cfg.data.clean_size)
    else:
        images = ds.train
        if 0 < cfg.pretrain.train_size < len(images):
            images = images.subset(stratified_indices(len(images), images.y, cfg.pretrain.train_size, cfg.seed + 2))
        subset = cfg.pretrain.train_size
    init_fp = fingerprint_encoder(start.encoder) if start is not None else None
    parts: tuple = ("pretrain", ds.version, spec.to_meta(), cfg.section_hash("pretrain"), cfg.seed, subset)
    if init_fp is not None:
        parts += ("init", init_fp)
    key = _key(*parts)
    done = _existing(out, key)
    if done is not None:
        log.info("pretrain: %s is up to date", out)
        return {"path": str(out), "seconds": 0.0, "cached": True, "fingerprint": fingerprint_encoder(done.encoder),
                "init": init_fp, "images": len(images)}
    rt = Runtime.from_config(cfg)
    t0 = time.perf_counter()
    enc, res = pretrain_simclr(
        images, spec, cfg.pretrain, seed=cfg.seed, work_dir=work / f"pretrain-{key}", key=key, device=rt.device,
        amp_dtype=rt.amp, progress=progress, init=start.encoder if start is not None else None,
    )
    meta = {"key": key, "stage": "pretrain", "data": ds.version, "history": res.history}
    extras = {}
    if start is not None:
        meta["init"] = init_fp
        extras = dict(start.extras)  # a fine-tuned teacher keeps its trigger/target record (for ASR)
    save_encoder(out, enc, meta=meta, extras=extras or None)
    return {"path": str(out), "seconds": time.perf_counter() - t0, "cached": False, "fingerprint": fingerprint_encoder(enc),
            "init": init_fp, "images": len(images), "history": res.history}


def stage_attack(cfg: Config, clean_path: Path, out: Path, work: Path, *, data: Dataset | None = None, progress: bool = True) -> dict:
    """BadEncoder teacher from the clean encoder -> ``out`` (trigger, target, references inside)."""
    from mimic.attacks.badencoder import badencoder, typical_references

    ds = data or load_data(cfg)
    if ds.train.y is None:
        raise DataError("the attack needs labelled data to pick reference images of the target class")
    a = cfg.attack
    if not 0 <= a.target_class < ds.num_classes:
        raise DataError(f"attack.target_class {a.target_class} out of range for {ds.num_classes} classes")
    clean = load_encoder(clean_path)
    clean_fp = fingerprint_encoder(clean.encoder)
    key = _key("attack", clean_fp, ds.version, cfg.section_hash("attack"), cfg.seed)
    done = _existing(out, key)
    if done is not None:
        log.info("attack: %s is up to date", out)
        return {"path": str(out), "seconds": 0.0, "cached": True, "fingerprint": fingerprint_encoder(done.encoder)}
    trigger = white_patch(a.trigger_size, a.trigger_margin, ds.train.x.shape[-1])
    target_idx = torch.nonzero(ds.train.y == a.target_class).flatten()
    if len(target_idx) < a.n_reference:
        raise DataError(f"only {len(target_idx)} images of the target class; need {a.n_reference} references")
    reference = ds.train.x[typical_references(clean.encoder, ds.train.x, target_idx, a.n_reference)]
    shadow_n = min(a.shadow_size, len(ds.train))
    shadow = ds.train.subset(stratified_indices(len(ds.train), ds.train.y, shadow_n, cfg.seed + 4))
    rt = Runtime.from_config(cfg)
    t0 = time.perf_counter()
    teacher, res = badencoder(
        clean.encoder, shadow, reference, trigger, a, seed=cfg.seed, work_dir=work / f"attack-{key}", key=key,
        device=rt.device, amp_dtype=rt.amp, progress=progress,
    )
    extras = {**trigger.to_extras(), "reference_images": reference.clone(), "target_class": int(a.target_class)}
    save_encoder(out, teacher, meta={"key": key, "stage": "attack", "attack": "badencoder", "clean": clean_fp, "history": res.history}, extras=extras)
    return {"path": str(out), "seconds": time.perf_counter() - t0, "cached": False, "fingerprint": fingerprint_encoder(teacher)}


def stage_mi(cfg: Config, teacher: LoadedEncoder, clean: ImageSet, out_dir: Path, *, data_version: str) -> dict:
    """Per-stage MI on the teacher (or a random student), weights, ``mi.json`` + ``mi.png``."""
    from mimic.distill import make_student
    from mimic.mi import analyse, plot_mi

    m = cfg.mi
    fp = fingerprint_encoder(teacher.encoder)
    key = _key("mi", fp, data_version, cfg.section_hash("mi"), cfg.seed)
    path = out_dir / "mi.json"
    if path.exists():
        try:
            prev = json.loads(path.read_text())
            if prev.get("key") == key:
                log.info("mi: %s is up to date", path)
                return prev
        except (OSError, ValueError):
            pass
    rt = Runtime.from_config(cfg)
    t0 = time.perf_counter()
    net = teacher.encoder if m.network == "teacher" else make_student(teacher.encoder, "empty", cfg.seed)
    net = net.to(rt.device)
    result = analyse(
        net, clean, estimator=m.estimator, epochs=m.epochs, batch_size=m.batch_size, lr=m.lr, hidden=m.hidden,
        pool=m.pool, base=m.base, scale=m.scale, seed=cfg.seed, device=rt.device,
    )
    net.cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_mi(result, str(out_dir / "mi.png"))
    info = {"key": key, "network": m.network, **result.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}
    write_json(path, info)
    return info


def stage_distill(
    cfg: Config, teacher: LoadedEncoder, clean: ImageSet, weights: list[float], out_dir: Path, work: Path, *,
    data_version: str, progress: bool = True, on_epoch_end=None,
) -> dict:
    """MIMIC student -> ``out_dir/student.pt`` (+ ``losses.json``, ``losses.png``)."""
    from mimic.distill import distill, plot_losses, run_key
    from mimic.mi import uniform_weights

    d = cfg.distill
    if d.weights == "uniform":
        weights = uniform_weights(len(weights), cfg.mi.base, cfg.mi.scale)
    if len(clean) < min(d.batch_size, 2) or len(clean) < d.batch_size:
        raise DataError(f"clean set: {len(clean)} images, fewer than one batch ({d.batch_size}); add images or lower distill.batch_size")
    fp = fingerprint_encoder(teacher.encoder)
    key = run_key(fp, data_version, d, list(weights), cfg.seed)
    out = out_dir / "student.pt"
    stage_key = _key(key, d.epochs)
    done = _existing(out, stage_key)
    if done is not None:
        log.info("distill: %s is up to date", out)
        return {"path": str(out), "fingerprint": fingerprint_encoder(done.encoder), "seconds": 0.0, "cached": True,
                "history": done.meta.get("history", [])}
    rt = Runtime.from_config(cfg)
    res = distill(
        teacher.encoder, clean, d, weights, seed=cfg.seed, work_dir=work / f"distill-{key}", key=key, device=rt.device,
        amp_dtype=rt.amp, progress=progress, on_epoch_end=on_epoch_end,
    )
    sfp = fingerprint_encoder(res.student)
    meta = {"key": stage_key, "stage": "distill", "teacher_fingerprint": fp, "data": data_version, "weights": list(weights),
            "history": res.history, "resumed_from_epoch": res.resumed_from}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_encoder(out, res.student, meta=meta)
    write_json(out_dir / "losses.json", {"history": res.history})
    plot_losses(res.history, str(out_dir / "losses.png"))
    return {"path": str(out), "fingerprint": sfp, "seconds": res.seconds, "cached": False, "history": res.history,
            "resumed_from_epoch": res.resumed_from}


def attack_info(teacher: LoadedEncoder, trigger_path: str | None = None, target: int | None = None) -> tuple[Trigger | None, int | None]:
    """The trigger + target used to measure ASR: from ``--trigger``/``--target-class`` or the teacher file."""
    trigger = Trigger.load_npz(trigger_path) if trigger_path else Trigger.from_extras(teacher.extras)
    if target is None and "target_class" in teacher.extras:
        target = int(teacher.extras["target_class"])
    if trigger is None or target is None:
        return None, None
    return trigger, target


def stage_evaluate(cfg: Config, encoders: dict[str, LoadedEncoder], ds: Dataset, trigger: Trigger | None, target: int | None) -> dict:
    """CA/ASR of each named encoder with the same probe recipe; {name: {probe: {ca, asr}}}."""
    from mimic.evaluate import evaluate_encoder

    if ds.test is None or ds.test.y is None or ds.train.y is None:
        raise DataError(f"{ds.name}: evaluation needs a labelled train and test split")
    if target is not None and not 0 <= target < ds.num_classes:
        raise DataError(f"target class {target} out of range for {ds.num_classes} classes")
    rt = Runtime.from_config(cfg)
    probes = ("linear", "mlp") if cfg.evaluate.probe == "both" else (cfg.evaluate.probe,)
    train = labelled_train(cfg, ds)
    out: dict[str, dict] = {}
    for name, enc in encoders.items():
        res = evaluate_encoder(
            enc.encoder, train, ds.test, ds.num_classes, probes=probes, trigger=trigger, target=target,
            epochs=cfg.evaluate.epochs, lr=cfg.evaluate.lr, batch_size=cfg.evaluate.batch_size, seed=cfg.seed, device=rt.device,
        )
        enc.encoder.cpu()
        out[name] = {r.probe: r.to_dict() for r in res}
    return out


# ---------------------------------------------------------------------------------------------
# Whole runs


def audit(
    cfg: Config, teacher_path: str | Path, data_source: str | None, out_dir: Path, *, eval_source: str | None = None,
    trigger_path: str | None = None, target: int | None = None, progress: bool = True, work: Path | None = None,
) -> dict:
    """MI -> distillation -> evaluation for one teacher; writes the sanitized student."""
    t0 = time.perf_counter()
    rt = Runtime.from_config(cfg)
    teacher = load_encoder(teacher_path)
    fp = fingerprint_encoder(teacher.encoder)
    ds = load_data(cfg, data_source)
    clean = clean_subset(cfg, ds)
    work = work or out_dir / "work"
    log.info("teacher %s (%s, %s), clean set %d images of %s", fp[:12], teacher.spec.name, teacher.layout, len(clean), ds.name)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    clean_ver = content_hash(clean.x, clean.y)
    mi = stage_mi(cfg, teacher, clean, out_dir, data_version=clean_ver)
    seconds["mi"] = time.perf_counter() - t
    weights = [mi["weights"][s] for s in mi["stages"]]
    t = time.perf_counter()
    student = stage_distill(cfg, teacher, clean, weights, out_dir, work, data_version=clean_ver, progress=progress)
    seconds["distill"] = time.perf_counter() - t
    student_enc = load_encoder(student["path"])
    eval_ds = ds if eval_source is None else load_data(cfg, eval_source)
    trigger, target = attack_info(teacher, trigger_path, target)
    metrics: dict = {}
    primary = "mlp" if cfg.evaluate.probe == "mlp" else "linear"
    t = time.perf_counter()
    if eval_ds.test is not None and eval_ds.train.y is not None:
        metrics = stage_evaluate(cfg, {"teacher": teacher, "student": student_enc}, eval_ds, trigger, target)
    else:
        log.warning("no labelled test split in %s: CA/ASR not measured", eval_ds.name)
    seconds["evaluate"] = time.perf_counter() - t

    def pick(who: str, what: str):
        return metrics.get(who, {}).get(primary, {}).get(what)

    result = {
        "teacher_ca": pick("teacher", "ca"),
        "teacher_asr": pick("teacher", "asr"),
        "student_ca": pick("student", "ca"),
        "student_asr": pick("student", "asr"),
        "mi": mi["mi"],
        "weights": dict(zip(mi["stages"], weights)),
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "probe": primary,
        "probes": metrics,
        "target_class": target,
        "teacher": {"path": str(teacher_path), "fingerprint": fp, "arch": teacher.spec.name, "layout": teacher.layout},
        "student": {"path": student["path"], "fingerprint": student["fingerprint"], "cached": student["cached"]},
        "data": {"source": data_source or cfg.data.source, "version": ds.version, "clean_images": len(clean)},
        "mi_network": mi["network"],
        "environment": {**environment(rt.device), "seed": cfg.seed, "git": git_revision()},
        "config": cfg.to_dict(),
    }
    write_json(out_dir / "results.json", result)
    return result


def git_revision() -> str | None:
    """The source checkout's git revision, when mimic runs from one."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None


def demo(cfg: Config, out_dir: Path, *, progress: bool = True) -> dict:
    """Clean SimCLR encoder -> BadEncoder teacher -> MIMIC student, with CA/ASR of all three."""
    t0 = time.perf_counter()
    ds = load_data(cfg)
    work = out_dir / "work"
    log.info("demo on %s: %d train / %d test images, %d classes", ds.name, len(ds.train), len(ds.test or []), ds.num_classes)
    pre = stage_pretrain(cfg, out_dir / "clean.pt", work, data=ds, progress=progress)
    att = stage_attack(cfg, out_dir / "clean.pt", out_dir / "teacher.pt", work, data=ds, progress=progress)
    res = audit(cfg, out_dir / "teacher.pt", cfg.data.source, out_dir / "audit", progress=progress, work=work)
    clean_enc = load_encoder(out_dir / "clean.pt")
    teacher = load_encoder(out_dir / "teacher.pt")
    trigger, target = attack_info(teacher)
    t = time.perf_counter()
    clean_metrics = stage_evaluate(cfg, {"clean": clean_enc}, ds, trigger, target)["clean"]
    res["probes"]["clean"] = clean_metrics
    res["clean_ca"] = clean_metrics[res["probe"]]["ca"]
    res["clean_asr"] = clean_metrics[res["probe"]]["asr"]
    res["stage_seconds"] = {"pretrain": round(pre["seconds"], 2), "attack": round(att["seconds"], 2), **res["stage_seconds"],
                            "evaluate_clean": round(time.perf_counter() - t, 2)}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out_dir / "results.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# DVC-facing stages: data and teacher as files


def stage_data(cfg: Config, out: Path) -> dict:
    """Materialise ``data.source`` as one NPZ (x/y train and test, NHWC uint8) -- the pipeline's data."""
    import numpy as np

    ds = load_data(cfg)
    arrays = {"x_train": ds.train.x.permute(0, 2, 3, 1).numpy()}
    if ds.train.y is not None:
        arrays["y_train"] = ds.train.y.numpy()
    if ds.test is not None:
        arrays["x_test"] = ds.test.x.permute(0, 2, 3, 1).numpy()
        if ds.test.y is not None:
            arrays["y_test"] = ds.test.y.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"path": str(out), "version": ds.version, "train": len(ds.train), "test": len(ds.test or []),
            "classes": ds.num_classes, "skipped": ds.skipped}


def stage_teacher(cfg: Config, out: Path, work: Path, *, data_source: str | None = None, progress: bool = True) -> dict:
    """``teacher.source``: ``demo`` builds a BadEncoder teacher (clean SimCLR encoder first); a path or
    ``s3://`` URI is fetched, loaded safely and re-saved in mimic's format (trigger/target kept)."""
    src = cfg.teacher.source
    if src == "demo":
        ds = load_data(cfg, data_source)
        pre = stage_pretrain(cfg, work / "clean.pt", work, data=ds, progress=progress)
        att = stage_attack(cfg, work / "clean.pt", out, work, data=ds, progress=progress)
        return {"path": str(out), "source": "demo", "fingerprint": att["fingerprint"], "clean": pre["path"],
                "seconds": pre["seconds"] + att["seconds"]}
    from mimic.store import fetch

    local = fetch(src, work / "fetched")
    loaded = load_encoder(local)
    fp = fingerprint_encoder(loaded.encoder)
    extras = {k: v for k, v in loaded.extras.items() if k in ("trigger_patch", "trigger_mask", "target_class")}
    save_encoder(out, loaded.encoder, meta={"stage": "teacher", "source": src, "layout": loaded.layout}, extras=extras)
    return {"path": str(out), "source": src, "fingerprint": fp, "seconds": 0.0}
