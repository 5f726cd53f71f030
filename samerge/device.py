"""Where tensors are computed: ``device="auto" | "cpu" | "cuda" | "cuda:N"``, one rule for every part of samerge.

``auto`` is CUDA when torch sees a CUDA device, else the CPU. Every merge method, SA-Merging's flows, saliency and
selection, and ``merge_lora`` compute on the device they are given; inputs are read on the CPU (lazily, one tensor
at a time from files) and copied there, and merged tensors come back to the CPU to be written.
"""

from __future__ import annotations

import torch

from samerge.errors import SamergeError

DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


def check_device_name(device: str) -> str:
    """``device`` if it names a device samerge can use somewhere (no check that this machine has it)."""
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SamergeError(f"unknown device {device!r}; choose {DEVICE_HELP}") from None
    if dev.type not in ("cpu", "cuda"):
        raise SamergeError(f"device {device!r}: only cpu and cuda are supported")
    return device


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) -> CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given, checked
    against this machine (a clear error when it has no such device)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_name(device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SamergeError(f"device {device!r}: no CUDA device is available here (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SamergeError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
