"""Trigger inversion (mimic.scan): it tells the bench's BadEncoder teacher from its clean encoder
without labels or the trigger, its trigger loads as ``--trigger``, it is seeded, and the audit
without a trigger measures ASR with the inverted one and rejects a student that still scans
suspicious (a teacher-initialised student, which keeps the backdoor)."""

from __future__ import annotations

import json

import pytest
import torch

from mimic.gate import judge
from mimic.scan import invert_trigger, scan_verdict, start_points
from mimic.stages.scan import plan_scan, scan_record
from mimic.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")

# a shorter search than the shipped one (300 steps, 11 starts): the bench's encoders are small. The threshold is
# pinned: these tests check the mechanism on the bench's seed-0 pair (teacher PL1 ~0.02, its clean encoder ~0.09),
# not the shipped threshold, which benchmarks/bench_scan.py calibrates over many seeds (docs/scan.md)
SCAN_SETS = ("scan.steps=120", "scan.grid=2", "scan.probe_steps=30", "scan.stop_patience=40", "scan.batch_size=32",
             "scan.threshold=0.05")


def _scan(zoo, name, loaded, fp, *sets):
    cfg = zoo.config(*SCAN_SETS, *sets)
    clean, ver = zoo.clean_set(cfg)
    run = plan_scan(cfg, name, loaded, fp, clean, ver, progress=False).run(zoo.cache)
    return run, scan_record(run, cfg.scan.threshold)


def test_scan_flags_the_backdoored_teacher_and_not_its_clean_encoder(zoo, zoo_teacher):
    from mimic.fingerprint import fingerprint_encoder

    teacher, _ = zoo_teacher
    _, clean = _scan(zoo, "clean", zoo.clean, fingerprint_encoder(zoo.clean.encoder))
    _, bad = _scan(zoo, "teacher", teacher, fingerprint_encoder(teacher.encoder))
    assert bad["suspicious"] and not clean["suspicious"], (bad["pl1"], clean["pl1"])
    assert bad["pl1"] < clean["pl1"] / 2, "a backdoor's trigger is much smaller than a clean encoder's universal patch"
    assert bad["similarity"] >= bad["target_similarity"] - 0.02  # the trigger found really collapses the embeddings
    assert bad["target_class"] == 0  # the attack's target (bench: attack.target_class=0)


def test_the_inverted_trigger_loads_as_trigger_and_the_scan_is_seeded(zoo, zoo_teacher, tmp_path):
    from mimic.fingerprint import fingerprint_encoder
    from mimic.inputs import resolve_attack
    from mimic.stages.scan import settings_of

    teacher, _ = zoo_teacher
    run, rec = _scan(zoo, "teacher", teacher, fingerprint_encoder(teacher.encoder))
    trig = Trigger.load_npz(run.path("trigger"))
    assert trig.area == pytest.approx(rec["pl1"], abs=1e-4)
    attack = resolve_attack(None, str(run.path("trigger")), 0)  # what `--trigger trigger.npz --target-class 0` resolves to
    assert attack.known and torch.equal(attack.trigger.mask, trig.mask) and torch.equal(attack.trigger.patch, trig.patch)
    # no cache: the same search again gives the same trigger (seeded, deterministic on CPU)
    cfg = zoo.config(*SCAN_SETS, "scan.steps=40")
    clean, _ = zoo.clean_set(cfg)
    a = invert_trigger(teacher.encoder, clean, settings_of(cfg.scan), seed=cfg.seed)
    b = invert_trigger(teacher.encoder, clean, settings_of(cfg.scan), seed=cfg.seed)
    assert a.pl1 == b.pl1 and torch.equal(a.trigger.mask, b.trigger.mask)
    c = invert_trigger(teacher.encoder, clean, settings_of(cfg.scan), seed=cfg.seed + 1)
    assert not torch.equal(a.trigger.mask, c.trigger.mask)


def test_start_points_cover_the_image_and_the_verdict_is_a_threshold():
    masks, patterns, names = start_points(32, 32, 3, 0.375, torch.Generator().manual_seed(0))
    assert masks.shape == (11, 1, 32, 32) and patterns.shape == (11, 3, 32, 32)
    assert names[-2:] == ["whole image", "random"] and names[0] == "square@0,0" and names[8] == "square@20,20"
    assert scan_verdict(0.01, 0.05)["suspicious"] and not scan_verdict(0.05, 0.05)["suspicious"]
    assert "no trigger reached" in scan_verdict(1.0, 0.05, reached=False)["reason"]


def test_gate_rejects_a_student_that_still_scans_suspicious_and_names_the_evidence():
    from mimic.config import load_config

    gate = load_config().gate
    teacher = {"pl1": 0.01, "verdict": "suspicious", "suspicious": True, "reason": "PL1 0.0100 < threshold 0.05"}
    still = dict(teacher, pl1=0.012, reason="PL1 0.0120 < threshold 0.05")
    clean = {"pl1": 0.2, "verdict": "clean", "suspicious": False, "reason": "PL1 0.2000 >= threshold 0.05"}
    v = judge(60.0, 59.0, 3.0, gate, scan={"teacher": teacher, "student": still}, asr_trigger="inverted", target=0)
    assert not v.passed and "still scans suspicious" in v.reason and "student PL1 0.0120" in v.reason
    ok = judge(60.0, 59.0, 3.0, gate, scan={"teacher": teacher, "student": clean}, asr_trigger="inverted", target=0)
    assert ok.passed and "teacher PL1 0.0100 (suspicious)" in ok.reason and "inverted trigger" in ok.reason
    high = judge(60.0, 59.0, 40.0, gate, scan={"teacher": teacher, "student": clean}, asr_trigger="inverted", target=0)
    assert not high.passed and "student ASR 40.0%" in high.reason
    # the inverted "trigger" of a clean-scanning teacher is a universal patch: its ASR is reported, not gated
    benign = judge(60.0, 59.0, 40.0, gate, scan={"teacher": clean, "student": clean}, asr_trigger="inverted", target=0)
    assert benign.passed and "not gated" in benign.reason


def test_audit_without_a_trigger_measures_asr_with_the_inverted_one_and_rejects_a_flagged_student(zoo, zoo_teacher, tmp_path):
    """scan -> sanitize -> verify on a teacher whose trigger nobody gives: a student initialised
    from the teacher with no distillation keeps the backdoor, so it still scans suspicious."""
    from mimic.audit import AuditRequest, run_audit

    teacher, run = zoo_teacher
    cfg = zoo.config(*SCAN_SETS, "distill.student_init=teacher", "distill.epochs=1", "distill.lr=1e-6",
                     "mi.epochs=2", "evaluate.probe=linear", "evaluate.epochs=20")
    import numpy as np

    npz = tmp_path / "bench.npz"
    np.savez(npz, x_train=zoo.ds.train.x.permute(0, 2, 3, 1).numpy(), y_train=zoo.ds.train.y.numpy(),
             x_test=zoo.ds.test.x.permute(0, 2, 3, 1).numpy(), y_test=zoo.ds.test.y.numpy())
    stripped = tmp_path / "incoming.pt"  # the teacher as it arrives: weights only, no trigger in the file
    from mimic.checkpoints.save import save_encoder

    save_encoder(stripped, teacher.encoder)
    req = AuditRequest(teacher=str(stripped), data=str(npz))
    res = run_audit(cfg, req, root=tmp_path / "cache", out_dir=tmp_path / "out", progress=False)
    assert res["trigger"]["source"] == "inverted"
    assert res["scan"]["teacher"]["suspicious"] and res["scan"]["student"]["suspicious"]
    # the inverted trigger works on the teacher: far more of its triggered images hit the target than
    # the clean encoder's do under the same patch (a universal patch moves a clean encoder a little too)
    inverted = Trigger.load_npz(tmp_path / "out" / "trigger.npz")
    _, clean_asr = zoo.probe(zoo.clean.encoder, inverted, target=res["target_class"])
    assert res["teacher_asr"] is not None and res["teacher_asr"] >= clean_asr + 15, (res["teacher_asr"], clean_asr)
    assert res["student_asr"] is not None
    v = res["verdict"]
    assert not v["passed"] and "still scans suspicious" in v["reason"]
    assert "teacher PL1" in v["reason"] and "inverted trigger" in v["reason"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["teacher_pl1"] == res["scan"]["teacher"]["pl1"] and (tmp_path / "out" / "trigger.png").exists()
