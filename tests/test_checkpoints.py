"""Round trips of every supported layout and the strict, one-line load errors."""

from __future__ import annotations

import os
import random

import pytest
import torch
import torchvision

from mimic.checkpoints import (
    LoadedEncoder,
    canonical_state_dict,
    infer_spec,
    load_encoder,
    load_state,
    read_raw,
    save_encoder,
    save_state,
)
from mimic.encoders import CIFAR10_MEAN, Encoder, EncoderSpec
from mimic.errors import CheckpointError, ConfigError

RESEARCH = {"conv1": "f.f.0", "bn1": "f.f.1", "layer1": "f.f.3", "layer2": "f.f.4",
            "layer3": "f.f.5", "layer4": "f.f.6"}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(width: int = 4, seed: int = 0, **spec_kw) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder(EncoderSpec(width=width, **spec_kw))
    with torch.no_grad():  # non-trivial BN statistics so they are checked too
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(7)
    return enc.eval()


def backbone_sd(enc: Encoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in enc.backbone.state_dict().items()}


def to_research(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        out[f"{RESEARCH[head]}.{rest}"] = v
    return out


def assert_same(loaded: LoadedEncoder, enc: Encoder) -> None:
    got, want = loaded.encoder.backbone.state_dict(), enc.backbone.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not loaded.encoder.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(x), enc(x), atol=1e-6)


def error_of(path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        load_encoder(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    return msg


@pytest.fixture
def enc() -> Encoder:
    return make_encoder()


# ---------------------------------------------------------------- round trips


def test_roundtrip_mimic_pt(tmp_path, enc):
    path = tmp_path / "enc.pt"
    save_encoder(path, enc, meta={"epoch": 3, "tags": ["a", "b"]}, extras={"trigger": torch.ones(3), "note": "x"})
    loaded = load_encoder(path)
    assert loaded.layout == "mimic"
    assert loaded.spec == enc.spec
    assert loaded.meta == {"epoch": 3, "tags": ["a", "b"]}
    assert torch.equal(loaded.extras["trigger"], torch.ones(3)) and loaded.extras["note"] == "x"
    assert loaded.ignored == ()
    assert_same(loaded, enc)
    raw = read_raw(path)
    assert raw["format"] == "mimic-encoder" and raw["version"] == 1


def test_mimic_keeps_its_normalisation(tmp_path):
    enc = make_encoder(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = tmp_path / "enc.pt"
    save_encoder(path, enc)
    loaded = load_encoder(path, spec=EncoderSpec(width=4))
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.std == (0.25, 0.25, 0.25)
    assert_same(loaded, enc)
    assert load_encoder(path, mean=(0.1, 0.2, 0.3)).spec.mean == (0.1, 0.2, 0.3)


def test_roundtrip_mimic_safetensors(tmp_path, enc):
    path = tmp_path / "enc.safetensors"
    save_encoder(path, enc, meta={"source": "unit"})
    loaded = load_encoder(path)
    assert loaded.layout == "mimic+safetensors"
    assert loaded.spec == enc.spec
    assert loaded.meta == {"source": "unit"} and loaded.extras == {}
    assert_same(loaded, enc)
    with pytest.raises(ConfigError):
        save_encoder(tmp_path / "x.safetensors", enc, extras={"t": torch.ones(1)})
    assert not (tmp_path / "x.safetensors").exists()


def test_roundtrip_research_with_head_and_module_prefix(tmp_path, enc):
    sd = to_research(backbone_sd(enc))
    sd["g.0.weight"] = torch.randn(16, 32)
    sd["g.3.bias"] = torch.randn(8)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 200}
    path = tmp_path / "badencoder.pth"
    torch.save(wrapped, path)
    loaded = load_encoder(path)
    assert loaded.layout == "research"
    assert loaded.spec == EncoderSpec(width=4)
    assert loaded.ignored == ("g.0.weight", "g.3.bias")
    assert loaded.meta == {} and loaded.extras == {}
    assert_same(loaded, enc)

    bare = tmp_path / "bare.pt"
    torch.save(to_research(backbone_sd(enc)), bare)
    assert_same(load_encoder(bare), enc)


def test_research_safetensors(tmp_path, enc):
    from safetensors.torch import save_file

    path = tmp_path / "research.safetensors"
    save_file({k: v.contiguous() for k, v in to_research(backbone_sd(enc)).items()}, str(path))
    loaded = load_encoder(path)
    assert loaded.layout == "research+safetensors"
    assert_same(loaded, enc)


def test_roundtrip_torchvision_cifar_layout(tmp_path, enc):
    sd = backbone_sd(enc)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, 32), torch.randn(10)
    path = tmp_path / "tv.pt"
    torch.save(dict(reversed(list(sd.items()))), path)
    loaded = load_encoder(path)
    assert loaded.layout == "torchvision"
    assert loaded.spec.arch == "cifar_resnet18" and loaded.spec.width == 4
    assert loaded.spec.mean == CIFAR10_MEAN
    assert loaded.ignored == ("fc.bias", "fc.weight")
    assert_same(loaded, enc)


def test_imported_layout_takes_mean_std(tmp_path, enc):
    path = tmp_path / "tv.pt"
    torch.save(backbone_sd(enc), path)
    loaded = load_encoder(path, mean=[0.5, 0.5, 0.5], std=(0.2, 0.2, 0.2))
    assert loaded.spec.mean == (0.5, 0.5, 0.5) and loaded.spec.std == (0.2, 0.2, 0.2)
    spec = EncoderSpec(width=4, mean=(0.1, 0.1, 0.1))
    assert load_encoder(path, spec=spec).spec.mean == (0.1, 0.1, 0.1)


def test_roundtrip_torchvision_resnet18(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    loaded = load_encoder(path)
    assert loaded.spec.arch == "resnet18" and loaded.layout == "torchvision"
    assert loaded.ignored == ("fc.bias", "fc.weight")
    got = loaded.encoder.backbone.state_dict()
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    msg = error_of(path, spec=EncoderSpec(width=64))
    assert "wrong architecture: file holds resnet18, expected cifar_resnet18-w64" in msg


def test_infer_spec_shapes():
    assert infer_spec(torchvision.models.resnet50().state_dict()) == EncoderSpec(arch="resnet50")
    assert infer_spec(backbone_sd(make_encoder(width=8))) == EncoderSpec(width=8)
    with pytest.raises(CheckpointError, match="resnet34"):
        infer_spec(torchvision.models.resnet34().state_dict())
    with pytest.raises(CheckpointError, match="conv1.weight"):
        infer_spec({"foo.weight": torch.zeros(1)})


def test_resnet34_file_is_unsupported(tmp_path):
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    for stage, blocks in zip(range(1, 5), (3, 4, 6, 3)):
        for b in range(blocks):
            sd[f"layer{stage}.{b}.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "r34.pt"
    torch.save(sd, path)
    msg = error_of(path)
    assert "unsupported architecture" in msg and "resnet34" in msg


def test_canonical_state_dict_of_raw(enc):
    sd = to_research(backbone_sd(enc))
    canon, layout, spec_meta, ignored = canonical_state_dict({"state_dict": sd}, "x.pt")
    assert layout == "research" and spec_meta is None and ignored == ()
    assert set(canon) == set(enc.backbone.state_dict())


def test_missing_num_batches_tracked_is_filled(tmp_path, enc):
    sd = {k: v for k, v in backbone_sd(enc).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    loaded = load_encoder(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(x), enc(x), atol=1e-6)


# ---------------------------------------------------------------- strict errors


def test_missing_key_is_named(tmp_path, enc):
    sd = backbone_sd(enc)
    del sd["layer2.0.bn1.running_mean"]
    torch.save(sd, tmp_path / "m.pt")
    msg = error_of(tmp_path / "m.pt")
    assert "missing 1 key(s): layer2.0.bn1.running_mean" in msg


def test_unexpected_key_is_named(tmp_path, enc):
    sd = to_research(backbone_sd(enc))
    sd["f.f.9.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "u.pt")
    msg = error_of(tmp_path / "u.pt")
    assert "unexpected 1 key(s): f.f.9.weight" in msg


def test_shape_mismatch_is_named(tmp_path, enc):
    sd = backbone_sd(enc)
    sd["layer3.1.conv2.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save(sd, tmp_path / "s.pt")
    msg = error_of(tmp_path / "s.pt")
    assert "layer3.1.conv2.weight" in msg and "[16, 16, 1, 1]" in msg and "[16, 16, 3, 3]" in msg


def test_wrong_width(tmp_path, enc):
    save_encoder(tmp_path / "w4.pt", enc)
    msg = error_of(tmp_path / "w4.pt", spec=EncoderSpec(width=8))
    assert "wrong architecture: file holds cifar_resnet18-w4, expected cifar_resnet18-w8" in msg
    torch.save(backbone_sd(enc), tmp_path / "tv4.pt")
    assert "wrong architecture" in error_of(tmp_path / "tv4.pt", spec=EncoderSpec(arch="resnet50"))


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_are_named(tmp_path, enc, value, word):
    sd = backbone_sd(enc)
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = value
    torch.save(sd, tmp_path / "bad.pt")
    msg = error_of(tmp_path / "bad.pt")
    assert "layer1.0.conv1.weight" in msg and word in msg
    sd = to_research(backbone_sd(enc))
    sd["f.f.1.running_var"][1] = value
    torch.save({"state_dict": sd}, tmp_path / "bad_research.pt")
    msg = error_of(tmp_path / "bad_research.pt")
    assert "bn1.running_var" in msg and "f.f.1.running_var" in msg and word in msg


def test_inconsistent_mimic_metadata(tmp_path, enc):
    payload = {"format": "mimic-encoder", "version": 1, "spec": EncoderSpec(width=8).to_meta(),
               "state_dict": backbone_sd(enc), "meta": {}, "extras": {}}  # fmt: skip
    torch.save(payload, tmp_path / "lie.pt")
    assert "metadata says cifar_resnet18-w8, weights are cifar_resnet18-w4" in error_of(tmp_path / "lie.pt")
    payload["spec"] = {"arch": "cifar_resnet18", "width": 4, "mean": [0.5, 0.5]}
    torch.save(payload, tmp_path / "mean2.pt")
    assert "bad encoder spec in file metadata" in error_of(tmp_path / "mean2.pt")
    payload["spec"] = {"arch": "vit", "width": 4}
    torch.save(payload, tmp_path / "vit.pt")
    assert "unknown architecture 'vit'" in error_of(tmp_path / "vit.pt")
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    assert "unsupported mimic-encoder version 99" in error_of(tmp_path / "v99.pt")


def test_unknown_layout(tmp_path):
    torch.save({"foo": 1, "bar": [1, 2]}, tmp_path / "odd.pt")
    assert "unknown layout" in error_of(tmp_path / "odd.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "unknown layout" in error_of(tmp_path / "list.pt")
    torch.save({"a.weight": torch.zeros(3)}, tmp_path / "noconv.pt")
    assert "no conv1.weight" in error_of(tmp_path / "noconv.pt")


# ---------------------------------------------------------------- atomic saves and training state


def test_atomic_save_leaves_no_temp_files(tmp_path, enc, monkeypatch):
    save_encoder(tmp_path / "a.pt", enc)
    save_encoder(tmp_path / "a.pt", enc)  # overwrite
    save_encoder(tmp_path / "a.safetensors", enc)
    save_state(tmp_path / "s.pt", {"step": 1})
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.safetensors", "s.pt"]

    before = (tmp_path / "s.pt").read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_state(tmp_path / "s.pt", {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.safetensors", "s.pt"]
    assert (tmp_path / "s.pt").read_bytes() == before


def test_state_roundtrip(tmp_path, enc):
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    enc.train()
    enc(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {
        "epoch": 5,
        "model": enc.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "betas": [1.0, 2.5],
    }
    save_state(tmp_path / "ckpt.pt", state)
    back = load_state(tmp_path / "ckpt.pt")
    assert back["epoch"] == 5 and back["betas"] == [1.0, 2.5]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    random.setstate(back["rng"]["python"])
    opt.load_state_dict(back["optimizer"])


def test_save_state_refuses_non_plain(tmp_path):
    import numpy as np

    with pytest.raises(ConfigError, match=r"state\.rng"):
        save_state(tmp_path / "c.pt", {"rng": np.zeros(3)})
    assert not list(tmp_path.iterdir())


def test_load_state_truncated(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_state(path, {"w": torch.randn(1000), "epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    assert "\n" not in str(info.value) and "truncated" in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state(path)


def test_load_state_of_encoder_safetensors_is_refused(tmp_path, enc):
    save_encoder(tmp_path / "e.safetensors", enc)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_state(tmp_path / "e.safetensors")


# ---------------------------------------------------------------- accepted variants, refused kinds


def test_half_and_double_weights_are_accepted(tmp_path, enc):
    """Other float precisions are weights too: loaded as float32 (fp16 exactly)."""
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone_sd(enc).items()}
    torch.save(half, tmp_path / "h.pt")
    got = load_encoder(tmp_path / "h.pt").encoder.backbone.state_dict()
    for k, v in half.items():
        assert got[k].dtype == enc.backbone.state_dict()[k].dtype and torch.equal(got[k], v.to(got[k].dtype)), k
    torch.save({k: (v.double() if v.is_floating_point() else v) for k, v in backbone_sd(enc).items()}, tmp_path / "d.pt")
    assert_same(load_encoder(tmp_path / "d.pt"), enc)


def test_recompressed_checkpoint_still_loads(tmp_path, enc):
    """The zip-bomb limit leaves room for an honestly deflate-compressed checkpoint."""
    import zipfile

    save_encoder(tmp_path / "e.pt", enc)
    with zipfile.ZipFile(tmp_path / "e.pt") as zin, zipfile.ZipFile(tmp_path / "z.pt", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    assert_same(load_encoder(tmp_path / "z.pt"), enc)


@pytest.mark.parametrize(
    "make,word",
    [
        (lambda t: t.to_sparse(), "layout sparse_coo"),
        (lambda t: torch.empty_like(t, device="meta"), "meta tensor"),
        (lambda t: t.round().to(torch.int32), "dtype mismatch for bn1.weight (f.f.1.weight in the file): file has int32"),
        (lambda t: t.to(torch.complex64), "file has complex64"),
    ],
)
def test_non_dense_or_non_float_weights_are_named(tmp_path, enc, make, word):
    sd = to_research(backbone_sd(enc))
    sd["f.f.1.weight"] = make(sd["f.f.1.weight"])
    torch.save({"state_dict": sd}, tmp_path / "odd.pt")
    msg = error_of(tmp_path / "odd.pt")
    assert word in msg and "bn1.weight" in msg


def test_non_finite_weights_in_mimic_safetensors_are_refused(tmp_path, enc):
    with torch.no_grad():
        enc.backbone.layer2[0].bn2.running_mean[3] = float("nan")
    save_encoder(tmp_path / "e.safetensors", enc)
    msg = error_of(tmp_path / "e.safetensors")
    assert "non-finite weights: tensor layer2.0.bn2.running_mean has 1 NaN values" in msg


# ---------------------------------------------------------------- real-world layouts (issue 12 point 7)


def _with_heads(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in sd.items()}


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """file content -> ignored keys (after ``module.`` is stripped), for the wrappers seen in the wild."""
    head = {"fc.0.weight": torch.randn(8, 32), "fc.2.weight": torch.randn(4, 8)}
    moco = {**_with_heads(sd | head, "encoder_q."), **_with_heads(sd | head, "encoder_k."),
            "queue": torch.randn(4, 16), "queue_ptr": torch.zeros(1, dtype=torch.long)}  # fmt: skip
    moco_ignored = tuple(sorted([f"encoder_q.{k}" for k in head] + [f"encoder_k.{k}" for k in sd | head] + ["queue", "queue_ptr"]))
    simsiam = {**_with_heads(sd | head, "encoder."), "predictor.0.weight": torch.randn(8, 4)}
    mocov3 = {**_with_heads(sd, "base_encoder."), **_with_heads(sd, "momentum_encoder."), "predictor.0.weight": torch.randn(2, 2)}
    byol = {**_with_heads(sd, "online_network.encoder."), **_with_heads(sd, "target_network.encoder."),
            "online_network.projector.0.weight": torch.randn(2, 2)}  # fmt: skip
    return {
        "model.": (_with_heads(sd, "model."), ()),
        "visual.": (_with_heads(sd, "visual."), ()),
        "module.encoder_q. (MoCo v2)": ({f"module.{k}": v for k, v in moco.items()}, moco_ignored),
        "encoder.+predictor (SimSiam)": (simsiam, tuple(sorted([f"encoder.{k}" for k in head] + ["predictor.0.weight"]))),
        "encoder.+projector (SimCLR)": (_with_heads(sd, "encoder.") | {"projector.0.weight": torch.randn(2, 2)}, ("projector.0.weight",)),
        "base/momentum_encoder (MoCo v3)": (mocov3, tuple(sorted([f"momentum_encoder.{k}" for k in sd] + ["predictor.0.weight"]))),
        "online/target_network (BYOL)": (byol, tuple(sorted([f"target_network.encoder.{k}" for k in sd] + ["online_network.projector.0.weight"]))),
    }


@pytest.mark.parametrize("name", list(_layouts({})))
def test_real_world_prefixes_and_heads(tmp_path, enc, name):
    content, ignored = _layouts(backbone_sd(enc))[name]
    path = tmp_path / "x.pth"
    torch.save({"state_dict": content, "epoch": 100}, path)
    loaded = load_encoder(path)
    assert loaded.layout == "torchvision" and loaded.spec == EncoderSpec(width=4)
    assert loaded.ignored == ignored
    assert_same(loaded, enc)


@pytest.mark.parametrize(
    "content,words",
    [
        (lambda sd: _with_heads(sd, "encoder.") | _with_heads(sd, "student."), "2 candidate backbones (encoder., student.)"),
        (lambda sd: sd | _with_heads(sd, "backbone."), "2 candidate backbones ((top level), backbone.)"),
        (lambda sd: _with_heads(sd, "encoder_k."), "only momentum copies of a backbone (encoder_k.)"),
        (lambda sd: _with_heads(to_research(sd), "a.") | _with_heads(sd, "b."), "2 candidate backbones (a., b.)"),
    ],
)
def test_ambiguous_layouts_are_refused_with_the_candidates(tmp_path, enc, content, words):
    torch.save({"state_dict": content(backbone_sd(enc))}, tmp_path / "amb.pt")
    msg = error_of(tmp_path / "amb.pt")
    assert "ambiguous layout" in msg and words in msg, msg


def test_two_state_dicts_are_ambiguous(tmp_path, enc):
    torch.save({"state_dict": backbone_sd(enc), "model": backbone_sd(make_encoder(seed=1))}, tmp_path / "two.pt")
    assert "several state dicts (state_dict, model)" in error_of(tmp_path / "two.pt")


def test_badencoder_drupe_file_layout(tmp_path, enc):
    """The exact file BadEncoder/DRUPE write: {'epoch', 'state_dict' (DataParallel: module.f.f.*, module.g.*),
    'optimizer'} with a real SGD state (momentum buffers are tensors). The optimizer is plain data: it is
    read without running code and ignored."""
    import copy

    from mimic.encoders import ProjectionHead

    class SimCLRBase(torch.nn.Module):
        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            b = backbone
            self.f = torch.nn.Sequential(b.conv1, b.bn1, b.relu, b.layer1, b.layer2, b.layer3, b.layer4)

    class SimCLR(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = SimCLRBase(copy.deepcopy(enc).backbone)
            self.g = ProjectionHead(32)

    model = torch.nn.DataParallel(SimCLR())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.module.f.f(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    opt.zero_grad()  # the step changed the weights: what is loaded must be what the file holds
    path = tmp_path / "model_200.pth"
    torch.save({"epoch": 200, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)
    assert all(k.startswith("module.") for k in model.state_dict())
    raw = read_raw(path)
    assert any(isinstance(v["momentum_buffer"], torch.Tensor) for v in raw["optimizer"]["state"].values())
    loaded = load_encoder(path)
    assert loaded.layout == "research" and loaded.spec == EncoderSpec(width=4)
    assert loaded.ignored == tuple(sorted(k[len("module."):] for k in model.state_dict() if k.startswith("module.g.")))
    stepped = {f"{RESEARCH[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": k for k in backbone_sd(enc)}
    got = loaded.encoder.backbone.state_dict()
    for research_key, canonical in stepped.items():
        assert torch.equal(got[canonical], model.state_dict()[f"module.{research_key}"]), canonical


def test_cifar_resnet50(tmp_path):
    """ResNet-50 with the CIFAR stem: inferred from a plain state dict, stage taps, 2048-d features."""
    from mimic.encoders import StageTaps

    torch.manual_seed(0)
    net = Encoder(EncoderSpec(arch="cifar_resnet50")).eval()
    assert net.backbone.conv1.weight.shape == (64, 3, 3, 3) and isinstance(net.backbone.maxpool, torch.nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), StageTaps(net, net.stage_paths()) as taps:
        z = net(x)
        stages = taps.take()
    assert z.shape == (2, 2048) and [s.shape[-1] for s in stages] == [32, 16, 8, 4]
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in net.backbone.state_dict().items()}}, tmp_path / "c50.pth")
    loaded = load_encoder(tmp_path / "c50.pth")
    assert loaded.spec.arch == "cifar_resnet50" and loaded.spec.name == "cifar_resnet50"
    with torch.no_grad():
        assert torch.equal(loaded.encoder(x), z)
    assert infer_spec(net.backbone.state_dict()) == EncoderSpec(arch="cifar_resnet50")
    save_encoder(tmp_path / "c50.safetensors", net)
    assert load_encoder(tmp_path / "c50.safetensors", spec=EncoderSpec(arch="cifar_resnet50")).layout == "mimic+safetensors"
    with pytest.raises(CheckpointError, match="wrong architecture: file holds cifar_resnet50, expected resnet50"):
        load_encoder(tmp_path / "c50.pth", spec=EncoderSpec(arch="resnet50"))
