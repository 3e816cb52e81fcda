"""``--dtype``: which torch dtype a run's model computes in (``auto``: bfloat16 where the device is fast at it).

Only the model's weights and its forward take the dtype; klgap's own arithmetic (the SAE, the perturbations,
KL and ΔCE) is float32 whatever it is (float64 for ``--dtype float64`` reference runs). A low-precision run is
checked against float32 before its first batch (klgap/job/precision.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

AUTO = "auto"
LOW = (torch.bfloat16, torch.float16)

__all__ = ["AUTO", "LOW", "has_fast_bf16", "is_low", "run_dtype"]


def is_low(dtype: torch.dtype) -> bool:
    """A dtype whose runs are checked against float32."""
    return dtype in LOW


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_fast_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CUDA device of compute capability ≥ 8.0, or a CPU
    with AVX-512 BF16 or AMX-BF16 (elsewhere bfloat16 matmuls are emulated, slower than float32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value on `device`; ``auto``: bfloat16 where the device is fast at it,
    else float32."""
    if name == AUTO:
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    return getattr(torch, name)
