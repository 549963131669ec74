"""Stage ``pretrain``: a SimCLR encoder (clean, for demos and tests), from scratch or fine-tuned."""

from __future__ import annotations

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder, save_encoder
from mimic.config import Config
from mimic.data import Dataset, stratified_indices
from mimic.encoders import EncoderSpec
from mimic.fingerprint import fingerprint_encoder
from mimic.inputs import clean_subset
from mimic.ssl import pretrain_simclr
from mimic.stages.common import Runtime, StagePlan, training_dir


def plan_pretrain(cfg: Config, ds: Dataset, *, init: LoadedEncoder | None = None, clean: bool = False,
                 progress: bool = True) -> StagePlan:
    """``encoder.pt``. ``init``: fine-tune this encoder (its architecture, not ``cfg.encoder``);
    ``clean``: train on the defender's clean set D instead of the training split / ``pretrain.train_size``."""
    spec = init.spec if init is not None else EncoderSpec(cfg.encoder.arch, cfg.encoder.width)
    if clean:
        images, subset = clean_subset(cfg, ds), ["clean", cfg.data.clean_size]
    else:
        images, subset = ds.train, ["train", cfg.pretrain.train_size]
        if 0 < cfg.pretrain.train_size < len(images):
            images = images.subset(stratified_indices(len(images), images.y, cfg.pretrain.train_size, cfg.seed + 2))
    init_fp = fingerprint_encoder(init.encoder) if init is not None else None
    inputs = {"data": ds.version, "spec": spec.to_meta(), "subset": subset, "init": init_fp}

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        with training_dir(cache, "pretrain", cfg, inputs, cfg.pretrain.epochs, "SimCLR pre-training") as (work, lk):
            enc, res = pretrain_simclr(images, spec, cfg.pretrain, seed=cfg.seed, work_dir=work, key=lk, device=rt.device,
                                       amp_dtype=rt.amp, progress=progress, init=init.encoder if init is not None else None)
        meta = {"stage": "pretrain", "key": slot.key, "data": ds.version, "init": init_fp, "history": res.history}
        # a fine-tuned teacher keeps its trigger/target record (to measure ASR)
        save_encoder(slot.file("encoder.pt"), enc, meta=meta, extras=dict(init.extras) if init is not None else None)
        return {"files": {"encoder": "encoder.pt"}, "fingerprint": fingerprint_encoder(enc), "init": init_fp,
                "images": len(images), "history": res.history}

    return StagePlan("pretrain", cfg, inputs, "SimCLR pre-training", compute)
