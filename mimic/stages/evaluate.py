"""Stage ``evaluate``: CA (and ASR, when a trigger and target are known) of one encoder."""

from __future__ import annotations

from mimic.cache import Slot, StageCache
from mimic.checkpoints import LoadedEncoder
from mimic.config import Config
from mimic.data import Dataset
from mimic.errors import DataError
from mimic.evaluate import evaluate_encoder
from mimic.inputs import Attack, labelled_train
from mimic.io import write_json
from mimic.stages.common import Runtime, StagePlan


def probes_of(cfg: Config) -> tuple[str, ...]:
    return ("linear", "mlp") if cfg.evaluate.probe == "both" else (cfg.evaluate.probe,)


def protocols_of(cfg: Config) -> tuple[str, ...]:
    return ("raw", "zscore") if cfg.evaluate.zscore else ("raw",)


def check_labelled(ds: Dataset, attack: Attack) -> None:
    if ds.test is None or ds.test.y is None or ds.train.y is None:
        raise DataError(f"{ds.name}: evaluation needs a labelled train and test split")
    if attack.target is not None and not 0 <= attack.target < ds.num_classes:
        raise DataError(f"target class {attack.target} out of range for {ds.num_classes} classes")


def plan_evaluate(cfg: Config, name: str, encoder: LoadedEncoder, fingerprint: str, ds: Dataset,
                 attack: Attack) -> StagePlan:
    """``metrics.json``: ``{"probes": {name: {"probe", "kind", "protocol", "ca", "asr"}}, "target_class", "trigger"}``
    for ``encoder``; one entry per probe kind and protocol (``linear``, ``mlp``, ``linear_z``, ``mlp_z``)."""
    check_labelled(ds, attack)
    inputs = {"encoder": fingerprint, "data": ds.version, **attack.identity()}

    def compute(slot: Slot, cache: StageCache) -> dict:
        rt = Runtime.from_config(cfg)
        try:
            res = evaluate_encoder(
                encoder.encoder, labelled_train(cfg, ds), ds.test, ds.num_classes, probes=probes_of(cfg),  # type: ignore[arg-type]
                protocols=protocols_of(cfg),
                trigger=attack.trigger if attack.known else None, target=attack.target if attack.known else None,
                epochs=cfg.evaluate.epochs, lr=cfg.evaluate.lr, batch_size=cfg.evaluate.batch_size, seed=cfg.seed,
                device=rt.device)
        finally:
            encoder.encoder.cpu()
        info = {"fingerprint": fingerprint, "probes": {r.probe: r.to_dict() for r in res},
                "target_class": attack.target if attack.known else None, "trigger": attack.trigger_id}
        write_json(slot.file("metrics.json"), {"key": slot.key, **info})
        return {"files": {"metrics": "metrics.json"}, **info}

    return StagePlan("evaluate", cfg, inputs, f"evaluation of {name} {fingerprint[:12]}", compute, label=f"evaluate-{name}")
