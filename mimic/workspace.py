"""Content-addressed stage runs: the audit's heavy steps as functions of paths and content hashes.

Each heavy step (MI, distillation, evaluation) writes into ``ROOT/<stage>/<key>/`` where ``key``
is a hash of everything the step reads: the teacher fingerprint, the clean data's content hash,
the params of that stage, the seed and the code version. Any front (the Prefect flow, the CLI, a
test) that asks for the same step gets the same directory, so:

* a finished step is reused by every later audit, whatever its output directory;
* concurrent audits of one teacher serialise on ``ROOT/<stage>/<key>.lock`` and the waiting ones
  reuse the result instead of recomputing it (the lock dies with its process, even on SIGKILL);
* an interrupted step resumes from its checkpoints in the same directory.

Everything here takes and returns paths, strings and numbers, never tensors: this is the
interface the Prefect tasks wrap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from functools import lru_cache
from pathlib import Path

from mimic.checkpoints import load_encoder, save_encoder
from mimic.config import Config
from mimic.data import ImageSet, content_hash
from mimic.errors import DataError
from mimic.fingerprint import fingerprint_encoder
from mimic.locks import file_lock

log = logging.getLogger("mimic")


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the ``mimic`` package sources: cached results never outlive a code change."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")) + sorted(root.glob("*.yaml")):
        if p.name == "cli.py":  # the command line does not change what a stage computes
            continue
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def clean_version(clean: ImageSet) -> str:
    """Content hash of the defender's clean set (the images and labels MI and distillation see)."""
    return content_hash(clean.x, clean.y)


def dvc_md5(path: str | Path) -> str:
    """The hash ``dvc add`` records for a file (``md5`` of its bytes) or a directory (``.dir`` md5).

    Uses DVC's own hashing (``dvc_data``) when it is installed, so the value matches ``dvc add``
    and a ``.dvc`` file; falls back to a plain md5 for files.
    """
    path = Path(path)
    try:
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs.local import LocalFileSystem
        import tempfile

        fs = LocalFileSystem()
        with tempfile.TemporaryDirectory() as tmp:
            odb = HashFileDB(fs, tmp)
            _, _, obj = build(odb, str(path.resolve()), fs, "md5")
            return obj.hash_info.value
    except ImportError:
        if path.is_dir():
            raise
        h = hashlib.md5()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cheap identity steps


def describe_data(cfg: Config, source: str) -> dict:
    """Identity of a data source: DVC hash, mimic content hash, clean-subset hash and sizes."""
    from mimic.pipeline import clean_subset, load_data

    ds = load_data(cfg, source)
    clean = clean_subset(cfg, ds)
    if len(clean) < max(cfg.distill.batch_size, 2):
        raise DataError(f"{source}: clean set of {len(clean)} images, fewer than one batch ({cfg.distill.batch_size}); "
                        "add images or lower distill.batch_size")
    p = Path(source)
    if source != "synthetic" and not source.startswith("torchvision:") and p.exists():
        dvc = f"md5:{dvc_md5(p)}"
    else:
        dvc = f"{source.split(':')[0]}:{ds.version}"
    return {
        "source": source,
        "data_version": dvc,
        "dataset_version": ds.version,
        "clean_version": clean_version(clean),
        "clean_images": len(clean),
        "train_images": len(ds.train),
        "test_images": len(ds.test) if ds.test is not None else 0,
        "labelled": ds.test is not None and ds.test.y is not None and ds.train.y is not None,
        "num_classes": ds.num_classes,
        "skipped": ds.skipped,
    }


def describe_teacher(path: str | Path) -> dict:
    """Load a teacher safely (refusing anything unsafe) and return its identity."""
    loaded = load_encoder(path)
    return {
        "path": str(path),
        "fingerprint": fingerprint_encoder(loaded.encoder),
        "arch": loaded.spec.name,
        "layout": loaded.layout,
        "has_trigger": "trigger_patch" in loaded.extras,
        "target_class": int(loaded.extras["target_class"]) if "target_class" in loaded.extras else None,
    }


# ---------------------------------------------------------------------------------------------
# Keys (shared with the Prefect cache policies)


def mi_key(cfg: Config, teacher_fp: str, clean_ver: str) -> str:
    return _key("mi", teacher_fp, clean_ver, cfg.section_hash("mi"), cfg.seed, code_version())


def distill_key(cfg: Config, teacher_fp: str, clean_ver: str) -> str:
    # the MI params decide the weights, so they are part of the distillation's identity
    return _key("distill", teacher_fp, clean_ver, cfg.section_hash("mi", "distill"), cfg.seed, code_version())


def evaluate_key(cfg: Config, encoder_fp: str, eval_version: str, trigger_id: str | None, target: int | None) -> str:
    return _key("evaluate", encoder_fp, eval_version, cfg.section_hash("evaluate"), cfg.seed, trigger_id, target, code_version())


def _stage_dir(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / stage / key


# ---------------------------------------------------------------------------------------------
# Heavy steps


def _inputs(cfg: Config, teacher_path: str, source: str, expect: str | None):
    """(teacher, its fingerprint, clean set, clean-set hash); the hash must match ``expect`` when given."""
    from mimic.pipeline import clean_subset, load_data

    teacher = load_encoder(teacher_path)
    clean = clean_subset(cfg, load_data(cfg, source))
    ver = clean_version(clean)
    if expect is not None and ver != expect:
        raise DataError(f"{source}: the data changed while the audit ran (clean set {ver[:12]} != {expect[:12]})")
    return teacher, fingerprint_encoder(teacher.encoder), clean, ver


def run_mi(cfg: Config, teacher_path: str, data_source: str, root: str | Path, *, clean_ver: str | None = None) -> dict:
    """Per-stage MI + weights in ``ROOT/mi/<key>/`` (``mi.json``, ``mi.png``)."""
    from mimic.pipeline import stage_mi

    teacher, fp, clean, ver = _inputs(cfg, teacher_path, data_source, clean_ver)
    key = mi_key(cfg, fp, ver)
    out = _stage_dir(root, "mi", key)
    with file_lock(out.with_suffix(".lock"), what=f"MI of {fp[:12]}"):
        info = stage_mi(cfg, teacher, clean, out, data_version=ver)
    return {"key": key, "dir": str(out), "json": str(out / "mi.json"), "plot": str(out / "mi.png"),
            "stages": info["stages"], "mi": info["mi"], "weights": info["weights"], "network": info["network"],
            "seconds": info.get("seconds", 0.0)}


def run_distill(
    cfg: Config, teacher_path: str, data_source: str, weights: list[float], root: str | Path, *,
    clean_ver: str | None = None, progress: bool = True,
) -> dict:
    """MIMIC student in ``ROOT/distill/<key>/`` (``student.pt``, ``losses.json``, ``losses.png``, ``work/``)."""
    from mimic.pipeline import stage_distill

    teacher, fp, clean, ver = _inputs(cfg, teacher_path, data_source, clean_ver)
    key = distill_key(cfg, fp, ver)
    out = _stage_dir(root, "distill", key)
    with file_lock(out.with_suffix(".lock"), what=f"distillation of {fp[:12]}"):
        res = stage_distill(cfg, teacher, clean, weights, out, out / "work", data_version=ver, progress=progress)
    return {"key": key, "dir": str(out), "student": res["path"], "fingerprint": res["fingerprint"],
            "losses": str(out / "losses.json"), "plot": str(out / "losses.png"), "seconds": round(res["seconds"], 2),
            "reused": bool(res["cached"]), "resumed_from_epoch": res.get("resumed_from_epoch")}


def attack(teacher_path: str | None, trigger_path: str | None, target: int | None):
    """(trigger, target class) used to measure ASR -- from ``trigger_path``/``target`` or the teacher file;
    (None, None) when either is unknown (ASR is then not measured)."""
    from mimic.pipeline import attack_info

    if teacher_path is None:
        return None, None
    trigger, tgt = attack_info(load_encoder(teacher_path), trigger_path, target)
    return (trigger, tgt) if trigger is not None and tgt is not None else (None, None)


def attack_identity(teacher_path: str | None, trigger_path: str | None, target: int | None) -> dict:
    """``{"trigger_id", "target"}``: the content hash of the ASR trigger and the target (part of the eval key)."""
    trigger, tgt = attack(teacher_path, trigger_path, target)
    return {"trigger_id": content_hash(trigger.patch, trigger.mask) if trigger is not None else None, "target": tgt}


def run_evaluate(
    cfg: Config, name: str, encoder_path: str, eval_source: str, root: str | Path, *,
    teacher_path: str | None = None, trigger_path: str | None = None, target: int | None = None,
) -> dict:
    """CA/ASR of one encoder in ``ROOT/evaluate/<key>/metrics.json`` (trigger from the teacher or ``trigger_path``)."""
    from mimic.pipeline import load_data, stage_evaluate, write_json

    enc = load_encoder(encoder_path)
    fp = fingerprint_encoder(enc.encoder)
    ds = load_data(cfg, eval_source)
    trigger, tgt = attack(teacher_path, trigger_path, target)
    trig_id = content_hash(trigger.patch, trigger.mask) if trigger is not None else None
    key = evaluate_key(cfg, fp, ds.version, trig_id, tgt)
    out = _stage_dir(root, "evaluate", key)
    path = out / "metrics.json"
    with file_lock(out.with_suffix(".lock"), what=f"evaluation of {fp[:12]}"):
        if path.exists():
            try:
                prev = json.loads(path.read_text())
                if prev.get("key") == key:
                    return {**prev, "name": name, "path": str(path), "reused": True}
            except (OSError, ValueError):
                pass
        t0 = time.perf_counter()
        metrics = stage_evaluate(cfg, {name: enc}, ds, trigger, tgt)[name]
        info = {"key": key, "fingerprint": fp, "probes": metrics, "target_class": tgt, "trigger": trig_id,
                "seconds": round(time.perf_counter() - t0, 2)}
        write_json(path, info)
    return {**info, "name": name, "path": str(path), "reused": False}


def export_student(student_path: str | Path, out: str | Path, meta: dict) -> Path:
    """The student as ``.safetensors`` (weights + JSON metadata, no code) for stores and registries."""
    loaded = load_encoder(student_path)
    out = Path(out)
    save_encoder(out, loaded.encoder, meta={**{k: v for k, v in loaded.meta.items() if k != "history"}, **meta})
    return out


def copy_artifact(src: str | Path, dst_dir: str | Path) -> str:
    dst = Path(dst_dir) / Path(src).name
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return str(dst)


def primary_probe(cfg: Config) -> str:
    return "mlp" if cfg.evaluate.probe == "mlp" else "linear"


def pick(metrics: dict | None, probe: str, what: str) -> float | None:
    if not metrics:
        return None
    return metrics.get("probes", {}).get(probe, {}).get(what)


def audit_key(teacher_fp: str, data: dict, eval_data: dict, cfg: Config, attack_id: dict) -> str:
    """Identity of a whole audit: what MLflow and the registry use to stay idempotent."""
    return _key("audit", teacher_fp, data["clean_version"], eval_data["dataset_version"], cfg.section_hash(
        "mi", "distill", "evaluate", "gate"), cfg.seed, attack_id, code_version())


def assemble_results(
    cfg: Config, *, teacher: dict, teacher_uri: str, data: dict, eval_data: dict, mi: dict, student: dict,
    evals: dict[str, dict], seconds: dict[str, float], cached: dict[str, bool], total_seconds: float, device: str,
) -> dict:
    """The audit's results (the ``--json`` document): metrics, verdict, identities, environment, config."""
    from mimic.gate import judge
    from mimic.pipeline import git_revision
    from mimic.runtime import environment, resolve_device

    probe = primary_probe(cfg)
    t, s = evals.get("teacher"), evals.get("student")
    res = {
        "teacher_ca": pick(t, probe, "ca"),
        "teacher_asr": pick(t, probe, "asr"),
        "student_ca": pick(s, probe, "ca"),
        "student_asr": pick(s, probe, "asr"),
        "mi": mi["mi"],
        "weights": dict(zip(mi["stages"], [mi["weights"][k] for k in mi["stages"]])),
        "seconds": round(total_seconds, 2),
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cached": cached,
        "probe": probe,
        "probes": {who: e["probes"] for who, e in evals.items()},
        "target_class": (t or s or {}).get("target_class"),
        "mi_network": mi["network"],
        "teacher": {**{k: teacher[k] for k in ("fingerprint", "arch", "layout")}, "uri": teacher_uri, "path": teacher["path"]},
        "student": {"fingerprint": student["fingerprint"], "path": student["student"], "resumed_from_epoch": student.get("resumed_from_epoch")},
        "data": {"source": data["source"], "data_version": data["data_version"], "dataset_version": data["dataset_version"],
                 "clean_version": data["clean_version"], "clean_images": data["clean_images"],
                 "eval_source": eval_data["source"], "eval_version": eval_data["dataset_version"]},
        "environment": {**environment(resolve_device(device)), "seed": cfg.seed, "git": git_revision(), "code": code_version()},
        "config": cfg.to_dict(),
    }
    res["verdict"] = judge(res["teacher_ca"], res["student_ca"], res["student_asr"], cfg.gate).to_dict()
    return res
