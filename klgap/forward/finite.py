"""Non-finite numbers, refused where they enter a run: an SAE's weights when it is loaded (every loader, and
SAE objects handed over from Python), a batch's clean logits before anything is measured against them, and a
stored part before a resume reuses it. A NaN that gets past these would turn every statistic into null."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from klgap.errors import KlgapError

if TYPE_CHECKING:
    from klgap.protocols import LoadedSAE


def all_finite(values: Tensor) -> bool:
    """Whether every entry of a floating-point tensor is finite: one pass (its min and max, which a NaN turns
    into NaN), no ``[...] bool`` temporary as ``torch.isfinite(values).all()`` writes."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def describe_nonfinite(values: Tensor, allow_neg_inf: bool = False) -> str | None:
    """``"1 NaN"`` / ``"3 NaN, 2 +inf"`` for the non-finite entries of `values`, None when there are none.
    `allow_neg_inf`: −inf is a legitimate value (a masked vocabulary in logits) and is not counted."""
    if not values.is_floating_point() or all_finite(values):
        return None
    counts = {"NaN": int(torch.isnan(values).sum()), "+inf": int(torch.isposinf(values).sum()),
              "-inf": 0 if allow_neg_inf else int(torch.isneginf(values).sum())}
    text = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    return text or None


def named_tensors(module: object) -> Iterable[tuple[str, Tensor]]:
    """The parameters and buffers of an SAE module (``W_enc``, ``W_dec``, ``b_enc``, ``threshold``, ...)."""
    if isinstance(module, torch.nn.Module):
        yield from module.state_dict().items()


def check_sae_finite(sae: LoadedSAE) -> None:
    """Refuse an SAE with a NaN or an infinity in any of its tensors, naming each tensor and the count
    (``W_dec has 1 NaN``): a run with it would measure nothing but NaN."""
    bad = []
    with torch.no_grad():
        for name, tensor in named_tensors(sae.module):
            found = describe_nonfinite(tensor)
            if found:
                bad.append(f"{name} has {found}")
    if bad:
        raise KlgapError(f"the SAE {sae.source!r} has non-finite weights: {'; '.join(bad)}; klgap measures only "
                         "finite SAEs: re-export it from a good checkpoint or train it again")


def check_clean_logits(logits: Tensor) -> None:
    """Refuse clean logits ``[batch pos vocab]`` holding NaN or +inf, or a row with no finite logit (−inf alone
    is a masked vocabulary and fine): every KL against them would be NaN."""
    if all_finite(logits):
        return
    found = describe_nonfinite(logits, allow_neg_inf=True)
    if found is None and not bool(torch.isfinite(logits).any(-1).all()):
        found = "a position whose every logit is -inf"
    if found:
        raise NonFiniteLogits(f"the model's clean logits hold {found} (of {logits.numel()} values): the model "
                              "overflows in its dtype or is broken; try --dtype float32 (or bfloat16 for float16) "
                              "and check the model")


class NonFiniteLogits(KlgapError):
    """Clean logits that cannot be measured against (the engine adds which batch)."""


__all__ = ["NonFiniteLogits", "all_finite", "check_clean_logits", "check_sae_finite", "describe_nonfinite", "named_tensors"]
