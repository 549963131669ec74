"""MIMIC's direction on encoders that learn (the zoo bench, tests/conftest.py): the BadEncoder teacher's
ASR is high, the MIMIC student's is clearly lower and it still learned the task. A regression that lets the backdoor
through distillation (issue 18: the demo's student kept 22-69 % ASR) turns this red. (The `tiny`
profile cannot guard this: its 1-epoch encoders learn nothing and its attack implants nothing.)"""

from __future__ import annotations

import pytest

from mimic.inputs import load_teacher
from mimic.stages.distill import plan_distill
from mimic.stages.mi import plan_mi, weights_of
from mimic.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mimic_student_loses_the_backdoor_and_still_learns_the_task(zoo, zoo_teacher):
    teacher, run = zoo_teacher
    cfg = zoo.config("mi.epochs=10", "distill.epochs=30", "distill.batch_size=32")
    clean, ver = zoo.clean_set(cfg)
    fp = run.manifest["fingerprint"]
    mi = plan_mi(cfg, teacher, fp, clean, ver).run(zoo.cache)
    dist = plan_distill(cfg, teacher, fp, clean, ver, weights_of(mi), progress=False).run(zoo.cache)
    student = load_teacher(dist.path("student"))
    trigger = Trigger.from_extras(teacher.extras)
    _, clean_asr = zoo.probe(zoo.clean.encoder, trigger)
    t_ca, t_asr = zoo.probe(teacher.encoder, trigger)
    s_ca, s_asr = zoo.probe(student.encoder, trigger)
    assert t_asr >= 70, "precondition: the bench's attack implanted a backdoor"
    assert s_asr <= t_asr - 40 and s_asr <= clean_asr + 25, (clean_asr, t_asr, s_asr)
    assert s_ca >= 25 + 15, (t_ca, s_ca)  # it learned the task (4 classes: chance 25 %); 30 epochs on 160 images
