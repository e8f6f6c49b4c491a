"""Device helpers shared by the scripts and tools that time generation."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read next measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda (<GPU name>)``, as the timing statistics name devices."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
