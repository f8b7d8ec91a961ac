"""Where networks run: device resolution, what a run there costs, and bf16 support."""

from __future__ import annotations

import torch

from .errors import LcpnError


class DeviceError(LcpnError, ValueError):
    """The asked-for device is not available here."""


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "mps" and not _mps_available():
        raise DeviceError("--device mps was asked for, but Apple's MPS is not available")
    return torch.device(name)


# Measured (docs/benchmarks.md): fine-tuning the default backbone on a 2-core CPU.
CPU_FINETUNE_COST = "EfficientNet-B4 at 380 px takes 13-20 s per step of 16 images on 2 cores"


def describe(device: torch.device) -> str:
    """The device in words, e.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'the CPU (16 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"the CPU ({torch.get_num_threads()} threads)"
    return device.type


def training_note(device: torch.device, mode: str) -> str:
    """One line saying where training runs, and on a CPU what fine-tuning there costs."""
    line = f"{mode} mode runs on {describe(device)}"
    if mode == "finetune" and device.type == "cpu":
        line += (
            f"; warning: fine-tuning on a CPU is slow ({CPU_FINETUNE_COST}): use a CUDA GPU, or --mode features "
            "(a frozen backbone and small heads, minutes on a CPU)"
        )
    return line


def bf16_supported(device: torch.device) -> bool:
    """True where bfloat16 matrix work is native: recent GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def want_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 where supported; ``bf16`` / ``fp32``: as named."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision '{precision}'; choose auto, bf16 or fp32")
    return bf16_supported(device) if precision == "auto" else precision == "bf16"
