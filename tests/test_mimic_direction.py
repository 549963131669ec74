"""MIMIC's direction on encoders that learn (the zoo bench, tests/conftest.py): the BadEncoder teacher's
ASR is high, the MIMIC student's is clearly lower and it still learned the task. A regression that lets the backdoor
through distillation (issue 18: the demo's student kept 22-69 % ASR) turns this red. (The `tiny`
profile cannot guard this: its 1-epoch encoders learn nothing and its attack implants nothing.)"""

from __future__ import annotations

import statistics

import pytest

from mimic.inputs import load_teacher
from mimic.stages.distill import plan_distill
from mimic.stages.mi import plan_mi, weights_of
from mimic.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


SEEDS = (0, 1, 2)


def test_mimic_student_loses_the_backdoor_and_still_learns_the_task(zoo, zoo_teacher):
    """On the median of 3 distillation seeds: 30 epochs on 160 images sit near the edge where a student
    may fail to learn (on one CPU, seed 0 ended at chance CA 26.5 while seeds 1-6 reached 41-72), so one
    seed is a draw of the hardware's rounding, not a property of the method."""
    teacher, run = zoo_teacher
    fp = run.manifest["fingerprint"]
    trigger = Trigger.from_extras(teacher.extras)
    _, clean_asr = zoo.probe(zoo.clean.encoder, trigger)
    t_ca, t_asr = zoo.probe(teacher.encoder, trigger)
    assert t_asr >= 70, "precondition: the bench's attack implanted a backdoor"
    cas, asrs = [], []
    for seed in SEEDS:
        cfg = zoo.config("mi.epochs=10", "distill.epochs=30", "distill.batch_size=32", f"seed={seed}")
        clean, ver = zoo.clean_set(cfg)
        mi = plan_mi(cfg, teacher, fp, clean, ver).run(zoo.cache)
        dist = plan_distill(cfg, teacher, fp, clean, ver, weights_of(mi), progress=False).run(zoo.cache)
        s_ca, s_asr = zoo.probe(load_teacher(dist.path("student")).encoder, trigger)
        cas.append(s_ca)
        asrs.append(s_asr)
    s_ca, s_asr = statistics.median(cas), statistics.median(asrs)
    assert s_asr <= t_asr - 40 and s_asr <= clean_asr + 25, (clean_asr, t_asr, asrs)
    assert s_ca >= 25 + 15, (t_ca, cas)  # it learned the task (4 classes: chance 25 %)
