"""The audit: one teacher in, a sanitized (or rejected) student and ``results.json`` out.

    teacher (admitted once: content-addressed copy, fingerprint) + clean data (loaded once)
      -> scan teacher -> mi -> distill -> scan student
      -> evaluate teacher and student (ASR with the given trigger, else the teacher scan's inverted one)
      -> results.json (+ the gate's verdict: scan -> sanitize -> verify)

:func:`run_audit` is the only implementation: ``mimic demo`` (via :func:`run_demo`), the Prefect
flow behind ``mimic audit`` and the tests call it. The stages run through a *runner*: by default
directly in the :class:`~mimic.cache.StageCache`; the Prefect flow passes a runner that wraps each
stage in a task keyed on the same stage key. Storage, MLflow and DVC are the fronts' business.

Every stage run is bounded by ``timeouts.stage`` seconds: in a flow by Prefect's task timeout, here
by :func:`stage_deadline`, which stops the stage the way Prefect does in the main thread (an alarm
signal; the stage keeps what it checkpointed and its lock is released) and raises a one-line
:class:`~mimic.errors.StageTimeout` naming the stage and the setting.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimic.cache import StageCache
from mimic.checkpoints import save_encoder
from mimic.config import Config
from mimic.data import Dataset, ImageSet
from mimic.errors import StageTimeout
from mimic.identity import audit_key
from mimic.inputs import (Attack, Teacher, admit_teacher, clean_subset, clean_version, keep_copy, load_data,
                          load_teacher, require_clean_size, resolve_attack)
from mimic.stages.scan import inverted_trigger, plan_scan, scan_record
from mimic.io import copy_file, write_json
from mimic.report import write_report
from mimic.results import build_results, stage_record
from mimic.stages.common import StagePlan, StageRun
from mimic.stages.distill import effective_weights, plan_distill
from mimic.stages.evaluate import check_labelled, plan_evaluate
from mimic.stages.mi import plan_mi, weights_of

log = logging.getLogger("mimic")

Runner = Callable[[StagePlan], StageRun]


class _Expired(BaseException):
    """Raised into a stage by the alarm (a BaseException, so no ``except Exception`` in a stage swallows it)."""


@contextlib.contextmanager
def stage_deadline(name: str, seconds: float | None, setting: str = "timeouts.stage") -> Iterator[None]:
    """Stop the block after ``seconds`` (None or 0: no bound) with :class:`StageTimeout` for stage ``name``.

    The bound is a ``SIGALRM`` timer, as Prefect's own task timeout in the main thread: it also stops a
    stage stuck in a loop or a blocking call. Where no timer can be set (another thread, no
    ``SIGALRM``, a timer already in use) the stage runs unbounded, with a warning.
    """
    if not seconds:
        yield
        return
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        log.warning("%s=%g s is not enforced for stage %r here (needs the main thread and a free SIGALRM timer)",
                    setting, seconds, name)
        yield
        return
    armed = True

    def expire(signum: int, frame: Any) -> None:
        if armed:
            raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    except _Expired:
        raise StageTimeout(f"stage '{name}'", seconds, setting) from None
    finally:
        armed = False  # a signal already on its way after the block finished does nothing
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def direct(cache: StageCache, timeout: float | None = None) -> Runner:
    """Run each stage in ``cache`` in this process (the default runner), each bounded by ``timeout``
    seconds (``timeouts.stage``; None: no bound)."""

    def run(plan: StagePlan) -> StageRun:
        with stage_deadline(plan.name, timeout):
            return plan.run(cache)

    return run


def run_stage(cfg: Config, plan: StagePlan, cache: StageCache) -> StageRun:
    """Run one stage plan in ``cache`` bounded by ``cfg.timeouts.stage`` (what a stage command runs)."""
    return direct(cache, cfg.timeouts.stage or None)(plan)


@dataclass(frozen=True)
class AuditRequest:
    """What to audit: a local teacher file, the clean data, and optionally the ASR trigger."""

    teacher: str  # a local path (the fronts fetch s3:// URIs first)
    data: str  # data source (synthetic, PATH.npz, folder, torchvision:NAME:ROOT)
    eval_data: str | None = None  # labelled downstream data for CA/ASR (default: data)
    trigger: str | None = None  # trigger NPZ; default: the one stored in the teacher file
    target: int | None = None
    teacher_uri: str | None = None  # what the user named (recorded), default: teacher
    extra_encoders: Mapping[str, str] = field(default_factory=dict)  # more encoders to evaluate (demo: "clean")


@dataclass(frozen=True)
class AuditInputs:
    """Everything an audit reads, loaded once and checked before any heavy work starts."""

    teacher: Teacher
    data: Dataset
    clean: ImageSet
    clean_version: str
    eval_data: Dataset
    attack: Attack

    def data_record(self, req: AuditRequest) -> dict[str, Any]:
        return {"source": req.data, "dataset_version": self.data.version, "clean_version": self.clean_version,
                "clean_images": len(self.clean), "eval_source": req.eval_data or req.data,
                "eval_version": self.eval_data.version, "skipped": self.data.skipped}

    @property
    def labelled(self) -> bool:
        ev = self.eval_data
        return ev.test is not None and ev.test.y is not None and ev.train.y is not None

    def collapse_set(self, cfg: Config) -> tuple[ImageSet | None, str | None]:
        """Labelled images of the downstream task that name a scan's collapse class: the clean set when
        the eval data is the clean data, else ``data.clean_size`` stratified eval training images."""
        if self.eval_data is self.data:
            return (self.clean, self.clean_version) if self.clean.y is not None else (None, None)
        if self.eval_data.train.y is None:
            return None, None
        images = clean_subset(cfg, self.eval_data)
        return images, clean_version(images)


def prepare(cfg: Config, req: AuditRequest, root: str | Path) -> AuditInputs:
    """Admit the teacher (refusing unsafe files), load the data, check sizes: every one-line refusal here."""
    teacher = admit_teacher(req.teacher, cfg.limits)
    ds = load_data(cfg, req.data)
    clean = clean_subset(cfg, ds)
    require_clean_size(cfg, clean, req.data)
    ev = ds if req.eval_data in (None, req.data) else load_data(cfg, req.eval_data)
    teacher = keep_copy(teacher, Path(root) / "teachers")  # nothing is written before every check passed
    inputs = AuditInputs(teacher, ds, clean, clean_version(clean), ev, resolve_attack(teacher.loaded, req.trigger, req.target))
    if inputs.labelled:
        check_labelled(ev, inputs.attack)
    return inputs


def default_out(teacher_fp: str) -> Path:
    return Path("runs/audits") / teacher_fp[:12]


def run_audit(
    cfg: Config, req: AuditRequest, *, root: str | Path = "runs/cache", out_dir: str | Path | None = None,
    runner: Runner | None = None, inputs: AuditInputs | None = None, progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None, kind: str = "audit",
    stages: Mapping[str, StageRun] | None = None, started: float | None = None,
) -> dict[str, Any]:
    """MI -> distillation -> evaluation for one teacher; writes ``results.json``, ``report.html`` and the student to ``out_dir``.

    ``stages``: runs done before the audit (the demo's pre-training and attack), recorded with it;
    ``started``: ``time.perf_counter()`` when the whole command started (default: now).
    """
    t0 = time.perf_counter() if started is None else started
    cache = StageCache(root, lock_timeout=cfg.timeouts.lock or None)
    run = runner or direct(cache, cfg.timeouts.stage or None)
    x = inputs or prepare(cfg, req, root)
    teacher, fp = x.teacher, x.teacher.fingerprint
    log.info("teacher %s (%s, %s), clean set %d images of %s", fp[:12], teacher.loaded.spec.name, teacher.loaded.layout,
             len(x.clean), x.data.name)
    runs: dict[str, StageRun] = dict(stages or {})
    labelled, labelled_ver = x.collapse_set(cfg)

    def scan(name: str, enc: Any, efp: str) -> StageRun:
        plan = plan_scan(cfg, name, enc, efp, x.clean, x.clean_version, labelled=labelled, labelled_ver=labelled_ver,
                         progress=progress)
        runs[plan.name] = run(plan)
        return runs[plan.name]

    scan("teacher", teacher.loaded, fp)
    runs["mi"] = run(plan_mi(cfg, teacher.loaded, fp, x.clean, x.clean_version))
    weights = effective_weights(cfg, weights_of(runs["mi"]))
    runs["distill"] = run(plan_distill(cfg, teacher.loaded, fp, x.clean, x.clean_version, weights_of(runs["mi"]),
                                       progress=progress, on_epoch_end=on_epoch_end))
    student_path = runs["distill"].path("student")
    student_fp = runs["distill"].manifest["fingerprint"]
    scan("student", load_teacher(student_path), student_fp)
    scans = {who: scan_record(runs[f"scan-{who}"], cfg.scan.threshold) for who in ("teacher", "student")}
    attack = asr_attack(x.attack, runs["scan-teacher"])

    evaluations: dict[str, dict] = {}
    if x.labelled:
        encoders = {"teacher": (teacher.loaded, fp), "student": (load_teacher(student_path), student_fp)}
        for name, path in req.extra_encoders.items():
            enc = admit_teacher(path)
            encoders[name] = (enc.loaded, enc.fingerprint)
        for name, (enc, efp) in encoders.items():
            plan = plan_evaluate(cfg, name, enc, efp, x.eval_data, attack)
            runs[plan.name] = run(plan)
            evaluations[name] = runs[plan.name].manifest
    else:
        log.warning("%s has no labelled train/test split: CA/ASR not measured", x.eval_data.name)

    out = Path(out_dir) if out_dir is not None else default_out(fp)
    akey = audit_key(fp, {k: r.key for k, r in runs.items()}, cfg.gate)
    student_file = out / "student.safetensors"
    results = build_results(
        cfg, kind=kind, audit_key=akey, attack=attack, scan=scans, mi=runs["mi"].manifest, weights=weights, evaluations=evaluations,
        teacher={**teacher.info(), "uri": req.teacher_uri or req.teacher},
        student={"fingerprint": student_fp, "path": str(student_path), "file": str(student_file),
                 "resumed_from_epoch": runs["distill"].manifest.get("resumed_from_epoch")},
        data=x.data_record(req), stages={k: stage_record(r) for k, r in runs.items()},
        seconds=time.perf_counter() - t0, out=str(out))
    for stage, names in (("mi", ("json", "plot")), ("distill", ("losses", "plot"))):
        for name in names:
            copy_file(runs[stage].path(name), out / runs[stage].manifest["files"][name])
    for who in ("teacher", "student"):  # trigger.npz/png (the teacher's), student-trigger.npz/png
        for name in ("trigger", "plot"):
            src = runs[f"scan-{who}"].path(name)
            copy_file(src, out / (src.name if who == "teacher" else f"{who}-{src.name}"))
    student = load_teacher(student_path)
    save_encoder(student_file, student.encoder, meta={
        "stage": "distill", "teacher_fingerprint": fp, "audit_key": akey, "verdict": results["verdict"]["verdict"],
        "weights": weights, "key": runs["distill"].key})
    write_json(out / "results.json", results)
    write_report(results, out)
    return results


def asr_attack(given: Attack, teacher_scan: StageRun) -> Attack:
    """The trigger and target ASR is measured with: the given (or stored) one, else the teacher scan's
    inverted trigger and the class its stamped images collapse to (when labels named one)."""
    if given.known:
        return given
    target = teacher_scan.manifest.get("target_class")
    if target is None:
        return given
    return Attack(inverted_trigger(teacher_scan), int(target), "inverted")


def run_demo(cfg: Config, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Clean SimCLR encoder -> BadEncoder teacher -> MIMIC student, with CA/ASR of all three."""
    from mimic.stages.attack import plan_attack
    from mimic.stages.pretrain import plan_pretrain

    t0 = time.perf_counter()
    out = Path(out_dir)
    cache = StageCache(out / "cache", lock_timeout=cfg.timeouts.lock or None)
    ds = load_data(cfg)
    log.info("demo on %s: %d train / %d test images, %d classes", ds.name, len(ds.train), len(ds.test or []), ds.num_classes)
    pre = run_stage(cfg, plan_pretrain(cfg, ds, progress=progress), cache)
    att = run_stage(cfg, plan_attack(cfg, load_teacher(pre.path("encoder")), ds, progress=progress), cache)
    copy_file(pre.path("encoder"), out / "clean.pt")
    copy_file(att.path("encoder"), out / "teacher.pt")
    req = AuditRequest(teacher=str(out / "teacher.pt"), data=cfg.data.source, extra_encoders={"clean": str(out / "clean.pt")})
    return run_audit(cfg, req, root=cache.root, out_dir=out, progress=progress, kind="demo",
                     stages={"pretrain": pre, "attack": att}, started=t0)
