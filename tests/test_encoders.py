"""Encoders: our CIFAR ResNet-18 block against torchvision's (reference equivalence)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

from mimic.encoders import BasicBlock, Encoder, EncoderSpec, StageTaps
from mimic.losses import attention_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def with_torchvision_blocks(encoder: Encoder) -> Encoder:
    """A copy of ``encoder`` whose residual blocks are torchvision's, with the same weights."""
    twin = copy.deepcopy(encoder)
    paths = [name for name, m in twin.named_modules() if isinstance(m, BasicBlock)]
    assert len(paths) == 8
    for path in paths:
        ours = twin.get_submodule(path)
        parent_path, _, child = path.rpartition(".")
        theirs = TorchvisionBasicBlock(ours.conv1.in_channels, ours.conv1.out_channels, ours.stride,
                                       copy.deepcopy(ours.downsample))
        theirs.load_state_dict(ours.state_dict(), strict=True)
        setattr(twin.get_submodule(parent_path), child, theirs)
    assert not any(isinstance(m, BasicBlock) for m in twin.modules())
    return twin


def distillation_step(encoder: Encoder, x: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Forward + backward of a MIMIC-like loss: every stage output is tapped (used by the next
    stage, the shortcut and the attention loss) plus a loss on the features."""
    encoder.zero_grad(set_to_none=True)
    with StageTaps(encoder, encoder.stage_paths()) as taps:
        z = encoder(x)
        stages = taps.take()
    loss = sum(attention_loss(h, t) for h, t in zip(stages, targets)) + z.square().mean()
    loss.backward()
    return z.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def test_training_is_bit_identical_to_torchvision_blocks():
    torch.manual_seed(0)
    ours = Encoder(EncoderSpec(width=4)).train()
    theirs = with_torchvision_blocks(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad(), StageTaps(ours, ours.stage_paths()) as taps:
        ours.eval()(x)
        targets = [torch.randn(h.shape, generator=g) for h in taps.take()]
    ours.train()

    z_ours, grads_ours = distillation_step(ours, x, targets)
    z_theirs, grads_theirs = distillation_step(theirs, x, targets)
    assert torch.equal(z_ours, z_theirs)
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) > 40
    different = [n for n in grads_ours if not torch.equal(grads_ours[n], grads_theirs[n])]
    assert different == []
