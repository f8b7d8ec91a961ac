"""Where networks run: device resolution and bf16 support."""

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
