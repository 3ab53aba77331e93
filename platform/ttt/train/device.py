"""Device, precision and accelerator peak: chosen by config, so one code path runs on CPU and GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ttt.errors import UserError

# Dense bf16 peak of common accelerators, for MFU when train.peak_tflops is not given.
_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H20": 148.0, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' was asked for but no CUDA device is visible")
    return torch.device(
        "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"
    )


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 compute ('auto': on CUDA); parameters, fast weights and losses stay fp32 either way."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if not uses_bf16(device, precision):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in _PEAK_TFLOPS.items() if key in name), None)
