"""The attack zoo: each attack implants a backdoor on the small bench (tests/conftest.py: ZooBench),
seeded, through its stage; DRUPE's distribution terms and the adaptive attack's learned trigger
do what their docstrings say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimic import identity
from mimic.attacks.drupe import sliced_wasserstein
from mimic.losses import mean_pairwise_cosine
from mimic.inputs import load_teacher
from mimic.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


def test_badencoder_raises_asr_and_keeps_ca(zoo, zoo_teacher):
    teacher, run = zoo_teacher
    trigger = Trigger.from_extras(teacher.extras)
    clean_ca, clean_asr = zoo.probe(zoo.clean.encoder, trigger)
    ca, asr = zoo.probe(teacher.encoder, trigger)
    assert clean_ca > 50, "the bench's clean encoder must learn something for ASR to mean anything"
    assert asr >= clean_asr + 50 and asr >= 70, (clean_asr, asr)
    assert ca >= clean_ca - 10
    assert run.manifest["attack"] == "badencoder" and teacher.extras["target_class"] == 0


def test_drupe_raises_asr_and_its_distribution_terms_are_on(zoo):
    from mimic.stages.drupe import plan_drupe

    cfg = zoo.config("attack.epochs=6", "drupe.warmup_epochs=2", "attack.n_reference=3")
    run = plan_drupe(cfg, zoo.clean, zoo.ds, progress=False).run(zoo.cache)
    teacher = load_teacher(run.path("encoder"))
    trigger = Trigger.from_extras(teacher.extras)
    _, clean_asr = zoo.probe(zoo.clean.encoder, trigger)
    ca, asr = zoo.probe(teacher.encoder, trigger)
    assert asr >= clean_asr + 40, (clean_asr, asr)
    assert teacher.extras["reference_images"].shape[0] == 3
    hist = run.manifest["history"]
    assert len(hist) == 6 and {"distribution", "concentration", "balance"} <= set(hist[-1])
    assert run.manifest["attack"] == "drupe"


def test_sliced_wasserstein_is_a_distance_between_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(256, 16, generator=g)
    perm = a[torch.randperm(256, generator=g)]
    assert float(sliced_wasserstein(a, perm, 32, torch.Generator().manual_seed(1))) < 1e-4  # order does not matter
    shifted = sliced_wasserstein(a, a + 1.0, 32, torch.Generator().manual_seed(1))
    further = sliced_wasserstein(a, a + 3.0, 32, torch.Generator().manual_seed(1))
    assert 0.05 < float(shifted) < float(further)
    with pytest.raises(ValueError, match="equal sample sizes"):
        sliced_wasserstein(a, a[:10], 8, g)
    same = torch.ones(5, 4)
    assert float(mean_pairwise_cosine(same)) == pytest.approx(1.0)
    assert float(mean_pairwise_cosine(torch.eye(4))) == pytest.approx(0.0)


def test_adaptive_attack_learns_its_trigger_and_raises_asr(zoo, tmp_path):
    from mimic.stages.adaptive import plan_adaptive

    cfg = zoo.config("attack.epochs=4")
    run = plan_adaptive(cfg, zoo.clean, zoo.ds, progress=False).run(zoo.cache)
    teacher = load_teacher(run.path("encoder"))
    learned = Trigger.from_extras(teacher.extras)
    start = Trigger.load_npz(_white(tmp_path))
    inside = learned.mask[0] > 0
    assert torch.equal(learned.mask, start.mask), "the mask is fixed; only the pattern is learned"
    assert not torch.allclose(learned.patch[:, inside], start.patch[:, inside]), "the pattern moved"
    assert torch.equal(learned.patch[:, ~inside], start.patch[:, ~inside])
    assert learned.patch.min() >= 0 and learned.patch.max() <= 1
    npz = Trigger.load_npz(run.path("trigger"))  # the file holds the learned trigger too (uint8 steps)
    assert torch.allclose(npz.patch, learned.patch, atol=1 / 255)
    _, clean_asr = zoo.probe(zoo.clean.encoder, learned)
    _, asr = zoo.probe(teacher.encoder, learned)
    assert asr >= clean_asr + 40, (clean_asr, asr)
    hist = run.manifest["history"]
    assert "student_effectiveness" not in hist[0] and "student_effectiveness" in hist[-1]  # warm-up, then the attack


def _white(tmp_path):
    from mimic.triggers import white_patch

    white_patch().save_npz(tmp_path / "white.npz")
    return tmp_path / "white.npz"


def test_each_attack_is_its_own_stage():
    """Editing one attack re-runs that attack only; each stage reads its own section."""
    mods = {s: set(identity.code_modules(s)) for s in ("attack", "drupe", "adaptive")}
    assert "mimic.attacks.drupe" not in mods["attack"] | mods["adaptive"]
    assert "mimic.attacks.adaptive" not in mods["attack"] | mods["drupe"]
    assert "mimic.attacks.badencoder" not in mods["drupe"] | mods["adaptive"]
    assert all("mimic.attacks.common" in m for m in mods.values())
    assert "drupe" in identity.STAGES["drupe"].params and "drupe" not in identity.STAGES["attack"].params


def test_attack_cli_writes_teacher_and_trigger(zoo, tmp_path):
    from mimic.cli import main

    out = tmp_path / "t.pt"
    assert main(["attack", "drupe", "--profile", "tiny", "--set", "attack.epochs=1", "--clean", str(zoo.clean_path),
                 "--out", str(out), "--trigger-out", str(tmp_path / "t.npz"), "--cache", str(tmp_path / "c"), "-q",
                 "--json", str(tmp_path / "r.json")]) == 0
    rec = __import__("json").loads((tmp_path / "r.json").read_text())
    assert rec["stage"] == "drupe" and rec["attack"] == "drupe" and rec["history"][0]["epoch"] == 1
    with np.load(tmp_path / "t.npz") as z:
        assert z["t"].shape == (1, 32, 32, 3)
    assert load_teacher(out).extras["target_class"] == 0
