"""`mimic pretrain --init PATH --clean-subset`: SimCLR fine-tuning of an existing encoder on D."""

from __future__ import annotations

import json

import torch

from conftest import write_npz
from mimic.checkpoints import load_encoder, save_encoder
from mimic.cli import main
from mimic.fingerprint import fingerprint_encoder
from mimic.triggers import white_patch

ARGS = ["--profile", "tiny", "--set", "data.clean_size=40", "--quiet"]


def test_finetune_starts_from_init_and_trains_on_the_clean_subset(tiny_encoder, tmp_path):
    data = write_npz(tmp_path / "d.npz", n_train=120, n_test=40)
    trig = white_patch(10, 1, 32)
    save_encoder(tmp_path / "teacher.pt", tiny_encoder, meta={"stage": "attack"},
                 extras={**trig.to_extras(), "target_class": 1})
    teacher_fp = fingerprint_encoder(tiny_encoder)
    out, rec = tmp_path / "ft.pt", tmp_path / "ft.json"
    rc = main(["pretrain", "--data", str(data), "--init", str(tmp_path / "teacher.pt"), "--clean-subset",
               "--out", str(out), "--json", str(rec), *ARGS])
    assert rc == 0
    res = json.loads(rec.read_text())
    assert res["init"] == teacher_fp and res["images"] == 40 and not res["cached"]
    assert "device" in res["environment"]
    ft = load_encoder(out)
    assert ft.spec == tiny_encoder.spec and ft.meta["init"] == teacher_fp
    assert int(ft.extras["target_class"]) == 1  # the trigger record travels with the fine-tuned teacher
    # it started from the teacher: much closer to it than a fresh encoder trained the same way
    fresh = tmp_path / "fresh.pt"
    assert main(["pretrain", "--data", str(data), "--clean-subset", "--out", str(fresh), *ARGS]) == 0

    def dist(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sum(float((sa[k].float() - sb[k].float()).norm()) for k in sa if sa[k].is_floating_point())

    assert dist(ft.encoder, tiny_encoder) < 0.5 * dist(load_encoder(fresh).encoder, tiny_encoder)
    # same command again: cached (the init's fingerprint is part of the key) ...
    assert main(["pretrain", "--data", str(data), "--init", str(tmp_path / "teacher.pt"), "--clean-subset",
                 "--out", str(out), "--json", str(rec), *ARGS]) == 0
    assert json.loads(rec.read_text())["cached"]
    # ... and a different init is a different key: retrained
    other = tmp_path / "other.pt"
    with torch.no_grad():
        for p in tiny_encoder.parameters():
            p.add_(0.01)
    save_encoder(other, tiny_encoder, meta={})
    assert main(["pretrain", "--data", str(data), "--init", str(other), "--clean-subset", "--out", str(out),
                 "--json", str(rec), *ARGS]) == 0
    assert not json.loads(rec.read_text())["cached"]
