"""Precision, memory format and thread decisions (mimic.runtime)."""

from __future__ import annotations

import pytest
import torch

from mimic.encoders import EncoderSpec, build_encoder
from mimic.errors import ConfigError
from mimic.runtime import autocast_dtype, native_bf16, physical_cores, set_threads, use_channels_last

CPU = torch.device("cpu")


def test_auto_precision_follows_native_bf16(monkeypatch):
    assert autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not native_bf16(CPU) and autocast_dtype(CPU, "auto") is None  # emulated bf16 is ~20x slower
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert native_bf16(CPU) and autocast_dtype(CPU, "auto") is torch.bfloat16
    with pytest.raises(ConfigError):
        autocast_dtype(CPU, "fp8")


def test_channels_last_policy():
    wide, narrow = build_encoder(EncoderSpec(width=8)), build_encoder(EncoderSpec(width=4))
    assert not use_channels_last("auto", CPU, None, wide)  # fp32 CPU: NCHW (bit-identical to before)
    assert use_channels_last("auto", CPU, torch.bfloat16, wide)
    assert use_channels_last("channels_last", CPU, None, wide)
    assert not use_channels_last("contiguous", CPU, torch.bfloat16, wide)
    # oneDNN (torch 2.14) corrupts memory in an NHWC 1x1 stride-2 conv backward over 4 channels
    assert not use_channels_last("channels_last", CPU, None, narrow)
    with pytest.raises(ConfigError):
        use_channels_last("nhwc", CPU, None, wide)


def test_threads_default_to_this_process_share_of_physical_cores():
    before = torch.get_num_threads()
    try:
        cores = physical_cores()
        assert 1 <= cores <= (torch.multiprocessing.cpu_count() or cores)
        assert set_threads(share=2 * cores) == 1 == torch.get_num_threads()
        assert set_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
