"""Distillation: frozen teacher, no leaked hooks, exact resume, NaN detection."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mimic.distill import attention_factor, distill, parameters_unchanged
from mimic.encoders import count_hooks
from mimic.errors import TrainingDiverged
from mimic.checkpoints import load_state

WEIGHTS = [3500.0] * 4


def _cfg(tiny_config, **kw):
    return dataclasses.replace(tiny_config.distill, **kw)


def _run(teacher, images, cfg, work, **kw):
    return distill(teacher, images, cfg, WEIGHTS, seed=0, work_dir=work, key="k", device=torch.device("cpu"), progress=False, **kw)


def test_teacher_frozen_and_bit_identical(tiny_encoder, tiny_images, tiny_config, tmp_path):
    before = copy.deepcopy(tiny_encoder.state_dict())
    grads = []
    for p in tiny_encoder.parameters():
        p.register_hook(lambda g: grads.append(g))
    res = _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=1), tmp_path)
    assert grads == []  # no gradient ever reached a teacher parameter
    assert all(not p.requires_grad for p in tiny_encoder.parameters())
    assert not tiny_encoder.training
    assert parameters_unchanged(tiny_encoder, before)  # BN running stats included
    assert not parameters_unchanged(res.student, before)


def test_no_hooks_remain_after_distillation(tiny_encoder, tiny_images, tiny_config, tmp_path):
    res = _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=1), tmp_path)
    assert count_hooks(tiny_encoder) == 0
    assert count_hooks(res.student) == 0


def test_hooks_removed_even_when_training_fails(tiny_encoder, tiny_images, tiny_config, tmp_path):
    def boom(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=2), tmp_path, on_epoch_end=boom)
    assert count_hooks(tiny_encoder) == 0


def test_interrupted_then_resumed_equals_uninterrupted(tiny_encoder, tiny_images, tiny_config, tmp_path):
    cfg = _cfg(tiny_config, epochs=3)
    full = _run(copy.deepcopy(tiny_encoder), tiny_images, cfg, tmp_path / "full")

    def interrupt_after_first(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(copy.deepcopy(tiny_encoder), tiny_images, cfg, tmp_path / "cut", on_epoch_end=interrupt_after_first)
    assert load_state(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = _run(copy.deepcopy(tiny_encoder), tiny_images, cfg, tmp_path / "cut")
    assert resumed.resumed_from == 1
    assert resumed.history == full.history
    assert parameters_unchanged(resumed.student, full.student.state_dict())


def test_nan_loss_stops_within_one_step_and_keeps_checkpoint(tiny_encoder, tiny_images, tiny_config, tmp_path, monkeypatch):
    _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=1), tmp_path)
    good = load_state(tmp_path / "last.pt")
    import mimic.distill as d

    real_nt = d.nt_xent
    calls = {"n": 0}

    def nan_from_second_call(*a, **k):
        calls["n"] += 1
        out = real_nt(*a, **k)
        return out * float("nan") if calls["n"] >= 2 else out

    monkeypatch.setattr(d, "nt_xent", nan_from_second_call)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 2"):
        _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=3), tmp_path)
    assert calls["n"] == 2  # stopped at the first non-finite step
    after = load_state(tmp_path / "last.pt")
    assert after["epoch"] == good["epoch"] == 1
    for k, v in good["modules"]["student"].items():
        assert torch.equal(after["modules"]["student"][k], v)


def test_ablations_run_without_each_term(tiny_encoder, tiny_images, tiny_config, tmp_path):
    for i, off in enumerate(("contrastive", "attention", "clone")):
        res = _run(tiny_encoder, tiny_images, _cfg(tiny_config, epochs=1, **{off: False}), tmp_path / str(i))
        assert off not in res.history[0] and "loss" in res.history[0]


def test_deferred_loss_check_names_the_first_bad_step():
    """On accelerators and DDP ranks the losses are checked once per epoch, not per step."""
    from mimic.training import LossLog, MeanMeter

    log, meter = LossLog(["loss", "a"], "distill", 4, immediate=False), MeanMeter()
    for v, n in ((1.5, 32), (0.25, 32), (3.0, 7)):
        log.add(torch.tensor([v, v / 2]), n)
        meter.add({"loss": v, "a": v / 2}, n)
    assert log.means() == meter.means()  # the same float64 sums, in the same order
    log.add(torch.tensor([float("inf"), 0.0]), 32)
    log.add(torch.tensor([float("nan"), 0.0]), 32)
    with pytest.raises(TrainingDiverged, match="inf at epoch 5, step 4"):
        log.means()


def test_attention_schedule_is_a_half_cosine_from_one_to_end():
    assert [attention_factor(1.0, e, 5) for e in range(5)] == [1.0] * 5  # the default: constant weights
    f = [attention_factor(0.1, e, 5) for e in range(5)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1) and f[2] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(f, f[1:]))
    assert attention_factor(0.0, 0, 1) == 1.0  # a one-epoch run keeps the full weights


def test_attention_schedule_lowers_the_attention_weights_after_the_first_epoch(tiny_encoder, tiny_images, tiny_config, tmp_path):
    sched = _run(copy.deepcopy(tiny_encoder), tiny_images, _cfg(tiny_config, epochs=2, attention_end=0.25), tmp_path / "s")
    const = _run(copy.deepcopy(tiny_encoder), tiny_images, _cfg(tiny_config, epochs=2), tmp_path / "c")
    s0, s1 = (h["attention"] for h in sched.history)
    c0, c1 = (h["attention"] for h in const.history)
    assert s0 == pytest.approx(c0, rel=1e-5)  # epoch 0: factor 1, the same run
    assert s1 < 0.5 * c1  # epoch 1 of 2: factor 0.25 on every beta_l
