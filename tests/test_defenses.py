"""The baseline defences on the zoo bench: unlearning with a trigger (any Trigger: the attack's own,
or one read from an NPZ as the scan writes it), fine-pruning and CLP."""

from __future__ import annotations

import copy

import pytest
import torch

from mimic import identity
from mimic.cli import main
from mimic.defenses.prune import channel_lipschitz, clp
from mimic.inputs import load_teacher
from mimic.triggers import Trigger

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unlearning_with_the_trigger_removes_the_backdoor(zoo, zoo_teacher, tmp_path):
    from mimic.stages.unlearn import plan_unlearn

    teacher, run = zoo_teacher
    trigger = Trigger.from_extras(teacher.extras)
    trigger.save_npz(tmp_path / "trigger.npz")  # as the scan hands it over
    given = Trigger.load_npz(tmp_path / "trigger.npz")
    ca_t, asr_t = zoo.probe(teacher.encoder, trigger)
    clean, ver = zoo.clean_set()
    res = plan_unlearn(zoo.cfg, teacher, run.manifest["fingerprint"], clean, ver, given, progress=False).run(zoo.cache)
    enc = load_teacher(res.path("encoder"))
    ca, asr = zoo.probe(enc.encoder, trigger)
    assert asr <= asr_t - 40 and asr <= 35, (asr_t, asr)
    assert ca >= ca_t - 8, (ca_t, ca)
    assert res.manifest["images"] == len(clean) == zoo.cfg.data.clean_size  # the same budget as MIMIC
    assert enc.extras["target_class"] == 0  # the teacher's record travels on (ASR stays measurable)


def test_fine_pruning_zeroes_the_dormant_channels(zoo, zoo_teacher):
    from mimic.evaluate import extract_features
    from mimic.stages.prune import plan_prune

    teacher, run = zoo_teacher
    clean, ver = zoo.clean_set()
    cfg = zoo.config("prune.ratio=0.5")
    res = plan_prune(cfg, teacher, run.manifest["fingerprint"], clean, ver, progress=False).run(zoo.cache)
    enc = load_teacher(res.path("encoder")).encoder
    f = extract_features(enc, zoo.ds.test.x[:64])
    dead = (f.abs().amax(0) == 0).sum().item()
    d = teacher.encoder.feature_dim
    assert dead >= d // 2, "every pruned channel outputs exactly 0 after fine-tuning"
    assert res.manifest["defence"] == "fineprune" and res.manifest["pruned_channels"] == 3 * (d // 2)
    ca_t, _ = zoo.probe(teacher.encoder, Trigger.from_extras(teacher.extras))
    ca, _ = zoo.probe(enc, Trigger.from_extras(teacher.extras))
    assert ca >= ca_t - 15  # the fine-tuning restored the clean features


def test_clp_prunes_a_channel_with_an_outsized_lipschitz_bound(zoo):
    enc = copy.deepcopy(zoo.clean.encoder)
    bn = enc.backbone.layer4[0].bn1  # 32 channels (with 8, no z-score can exceed 3)
    conv = enc.backbone.layer4[0].conv1
    before = channel_lipschitz(conv, bn)
    with torch.no_grad():
        bn.weight[3] *= 50.0  # one channel made far more sensitive than its layer
    pruned_enc, pruned = clp(enc, 3.0)
    assert 3 in pruned["backbone.layer4.0.bn1"]
    out = pruned_enc.backbone.layer4[0].bn1
    assert float(out.weight[3]) == 0.0 and float(out.bias[3]) == 0.0
    assert float(bn.weight[3].detach()) != 0.0  # the input is not modified
    assert torch.allclose(channel_lipschitz(conv, bn)[:3], before[:3])
    _, none = clp(zoo.clean.encoder, 1000.0)
    assert not any(none.values())


def test_defend_cli(zoo, zoo_teacher, tmp_path):
    teacher_path = str(zoo_teacher[1].path("encoder"))
    common = ["--profile", "tiny", "--set", "unlearn.epochs=1", "--cache", str(tmp_path / "c"), "-q"]
    assert main(["defend", "unlearn", "--teacher", teacher_path, "--trigger", teacher_path, "--out",
                 str(tmp_path / "u.pt"), *common]) == 0
    assert main(["defend", "prune", "--teacher", teacher_path, "--set", "prune.method=clp", "--out", str(tmp_path / "p.pt"),
                 *common, "--json", str(tmp_path / "p.json")]) == 0
    assert '"defence": "clp"' in (tmp_path / "p.json").read_text()


def test_unlearning_without_a_trigger_is_a_one_line_error(zoo, capsys, tmp_path):
    rc = main(["defend", "unlearn", "--profile", "tiny", "--teacher", str(zoo.clean_path), "--trigger", str(zoo.clean_path),
               "--out", str(tmp_path / "u.pt"), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "carries no trigger" in err and len(err.splitlines()) == 1


def test_defences_are_their_own_stages():
    assert "mimic.defenses.unlearn" in identity.code_modules("unlearn")
    assert "mimic.defenses.prune" not in identity.code_modules("unlearn")
    assert "mimic.defenses.unlearn" not in identity.code_modules("prune")
    assert not any(m.startswith("mimic.defenses") for m in identity.code_modules("distill"))


def test_one_trigger_lookup_for_npz_files_and_checkpoints(zoo, zoo_teacher, tmp_path):
    """mimic.inputs.load_trigger/resolve_attack: what `defend --trigger`, `evaluate --trigger` and the audit read."""
    from mimic.inputs import load_trigger, resolve_attack

    teacher, run = zoo_teacher
    stored = Trigger.from_extras(teacher.extras)
    stored.save_npz(tmp_path / "trigger.npz")
    path, limits = str(run.path("encoder")), zoo.cfg.limits
    from_npz, holder = load_trigger(str(tmp_path / "trigger.npz"), checkpoints=limits)
    assert holder is None and torch.equal(from_npz.mask, stored.mask)
    from_ckpt, holder = load_trigger(path, checkpoints=limits)
    assert holder is not None and torch.equal(from_ckpt.patch, stored.patch)
    assert load_trigger(None, teacher)[0] is not None and load_trigger(None) == (None, None)
    # a checkpoint as --trigger: its stored target, "teacher" unless a target is given
    assert (resolve_attack(None, path, checkpoints=limits).source, resolve_attack(None, path, checkpoints=limits).target) == ("teacher", 0)
    assert resolve_attack(None, path, 3, checkpoints=limits).source == "given"
    # an NPZ: "given"; the target from the teacher when none is given (the audit's call)
    attack = resolve_attack(teacher, str(tmp_path / "trigger.npz"))
    assert (attack.source, attack.target) == ("given", 0)
    assert resolve_attack(None, str(tmp_path / "trigger.npz")).known is False  # no target anywhere
    assert resolve_attack(teacher).source == "teacher" and resolve_attack(None, None, checkpoints=limits).known is False
