"""Helpers the conformance suites share: the model a ``--model`` value names, and a relative difference."""

from __future__ import annotations

from typing import Any

import torch


def model_for_tests(spec: str, device: str) -> Any:
    """The model a ``--model`` value names, float32 on `device` (held once: klgap.job.loading.load_model)."""
    from klgap.job.loading import load_model

    return load_model(spec, torch.device(device), torch.float32)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (b's scale floored at 1e-12)."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


__all__ = ["model_for_tests", "rel_diff"]
