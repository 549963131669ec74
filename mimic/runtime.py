"""Seeds, devices, precision, memory format and threads: the one place that decides them.

Every random stream in mimic is a ``torch.Generator`` derived from (run seed, purpose, epoch), so a
run resumed at epoch k draws exactly what an uninterrupted run draws.

``precision: auto`` is bf16 autocast where the hardware computes bf16 natively (CUDA with bf16;
CPUs with AVX512-BF16 or AMX) and fp32 elsewhere: on a CPU without them (e.g. AMD Zen 3, AVX2)
oneDNN emulates bf16 and a full-width distillation step is about 20x *slower* than fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

import torch

from mimic.errors import ConfigError


def derive_seed(seed: int, *salt: object) -> int:
    """A 63-bit seed derived from the run seed and a purpose, e.g. ``derive_seed(0, "distill", 3)``."""
    blob = repr((int(seed),) + tuple(str(s) for s in salt)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *salt: object, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *salt))
    return g


def seed_torch(seed: int, *salt: object) -> None:
    """Seed torch's global stream (parameter initialisation, dropout) for one purpose."""
    torch.manual_seed(derive_seed(seed, *salt))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CUDA: ``is_bf16_supported``; CPU: AVX512-BF16 or AMX).

    The CPU test reads the CPU's feature flags through torch's cpuinfo (``torch.cpu``); oneDNN's own
    "bf16 supported" answer is true on any AVX512 CPU, emulation included, so it is not used.
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 where :func:`native_bf16`, fp16 on a CUDA device without bf16, else fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    raise ConfigError(f"unknown precision {precision!r}")


def _conv_channels_ok(model: torch.nn.Module) -> bool:
    """Every convolution reads 3 or a multiple of 8 channels (see :func:`use_channels_last`)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return all(c.in_channels == 3 or c.in_channels % 8 == 0 for c in convs)


def use_channels_last(setting: str, device: torch.device, amp: torch.dtype | None, model: torch.nn.Module) -> bool:
    """Whether to run ``model`` in the channels_last (NHWC) memory format.

    ``setting`` (``distill.memory_format``): ``channels_last``, ``contiguous``, or ``auto``: on CUDA,
    and on a CPU with bf16 autocast (oneDNN's bf16 kernels work in NHWC); not for fp32 on a CPU,
    where it is worth a few percent at full width but is not bit-identical to NCHW (opt in there). On a CPU it is refused for convolutions over a channel
    count that is neither 3 nor a multiple of 8: torch 2.14's oneDNN corrupts memory in the backward
    pass of such an NHWC 1x1 stride-2 convolution (e.g. a width-4 ResNet's downsample).
    """
    if setting not in ("auto", "channels_last", "contiguous"):
        raise ConfigError(f"memory_format must be auto, channels_last or contiguous, got {setting!r}")
    want = (device.type == "cuda" or amp is not None) if setting == "auto" else setting == "channels_last"
    return want and (device.type != "cpu" or _conv_channels_ok(model))


def physical_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("?", str(cpu)))
    return max(1, len(cores))


def set_threads(n: int | None = None, *, share: int = 1) -> int:
    """Set torch's CPU threads: ``n``, or this process's share of the physical cores (``share``
    processes side by side, e.g. DDP ranks); returns the count set."""
    threads = n if n is not None else max(1, physical_cores() // max(1, share))
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
