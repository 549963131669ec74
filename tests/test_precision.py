"""bf16 autocast (issue 14, point 3): the path runs on any CPU and trains the student fp32 trains, within rounding.

Speed is benchmarks/' business (bench_distill.py, bench_precision.py); here only that the bf16 step really runs
in bf16 and that its student stays close to the fp32 one on a tiny model.
"""

from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F

from mimic.config import load_config
from mimic.data import ImageSet
from mimic.distill import prepare, run_epoch
from mimic.encoders import EncoderSpec, build_encoder
from mimic.runtime import generator, set_threads

CPU = torch.device("cpu")


def _distill(amp: torch.dtype | None, epochs: int, max_steps: int | None = None):
    """A tiny MIMIC student of a fixed random teacher, trained ``epochs`` epochs under ``amp``; the same seeds always."""
    set_threads(1)
    cfg = load_config(profile="tiny", sets=["distill.memory_format=contiguous"])
    torch.manual_seed(0)
    teacher = build_encoder(EncoderSpec(arch=cfg.encoder.arch, width=cfg.encoder.width))
    clean = ImageSet(torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    d = prepare(teacher, cfg.distill, [2.0, 1.5, 1.0, 0.5], seed=0, device=CPU, amp=amp)
    d.student.train()
    d.head.train()
    try:
        logs = [run_epoch(d, clean, e, generator(0, "distill", e), max_steps=max_steps) for e in range(epochs)]
    finally:
        d.close()
    return d, logs


def _features(student: torch.nn.Module) -> torch.Tensor:
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    student.eval()
    with torch.no_grad():
        return student(x)


@pytest.fixture(scope="module")
def students():
    return {name: _distill(amp, epochs=3) for name, amp in (("fp32", None), ("bf16", torch.bfloat16))}



def test_the_bf16_step_runs_in_bf16_and_its_losses_track_fp32(students):
    (d32, log32), (d16, log16) = students["fp32"], students["bf16"]
    assert d16.amp is torch.bfloat16 and d32.amp is None
    for a, b in zip(log32, log16, strict=True):
        assert all(math.isfinite(v) for v in b.values())
        assert b.keys() == a.keys()
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
        assert b["clone"] == pytest.approx(a["clone"], abs=0.02)  # -mean cos(f_S, f_T): the student clones as well
    # bf16 really ran: rounding moved the weights (a bf16 run that silently fell back to fp32 would be identical)
    assert any(not torch.equal(p, q) for p, q in zip(d32.student.parameters(), d16.student.parameters(), strict=True))


def test_one_bf16_step_moves_the_students_features_where_the_fp32_step_does():
    """From the same weights and batch, one step in each precision: the two students' features agree far more
    closely than either agrees with the untrained student, so bf16 changes the step only by rounding."""
    (s32, _), (s16, _) = (_distill(amp, epochs=1, max_steps=1) for amp in (None, torch.bfloat16))
    start, _ = _distill(None, epochs=0)
    f32, f16, f0 = (_features(d.student) for d in (s32, s16, start))
    assert f16.dtype == torch.float32  # the student is kept and evaluated in fp32
    apart = 1 - F.cosine_similarity(f32, f16, dim=1).mean()
    moved = 1 - F.cosine_similarity(f32, f0, dim=1).mean()
    assert moved > 0.05, "the step must move the features for the comparison to mean anything"
    assert apart < 0.2 * moved, (float(apart), float(moved))
