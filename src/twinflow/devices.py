"""Where the work runs and in which precision: ``--device`` and ``--dtype`` as torch objects.

One home for the rules every command shares (training, sampling, evaluation, generation):
``auto`` is CUDA when present, else the CPU; and bfloat16 on CUDA, float32 elsewhere. A training
run's ``precision: auto`` is bf16 autocast where the device computes bfloat16 natively, else fp32.
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` or ``"auto"``: bfloat16 on CUDA, float32 elsewhere; else a name or a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


PRECISIONS = ("fp32", "bf16", "auto")  # a training run's ``precision``


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA device that supports it, or a CPU
    with AVX512-BF16 or AMX tiles (there oneDNN's bf16 convolutions and matmuls run about twice as
    fast as float32; elsewhere they are emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(check() for check in checks if check is not None)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """A training run's compute precision, ``fp32`` or ``bf16`` (autocast): ``auto`` is ``bf16``
    where :func:`native_bf16` holds for ``device``, else ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


__all__ = ["DTYPES", "PRECISIONS", "native_bf16", "resolve_device", "resolve_dtype", "resolve_precision"]
