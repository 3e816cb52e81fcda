"""An SAE's numbers on held-out activations (training.json's explained variance, L0, cosine and MSE): the final
SAE's and every checkpoint's."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def evaluate(sae: Any, acts: Tensor, device: torch.device) -> dict[str, float]:
    """Explained variance, mean L0 and mean cos(x, x̂) of `sae` on ``acts [n d]``."""
    x = acts.to(device)
    feats = sae.encode(x)
    x_hat = sae.decode(feats)
    total = ((x - x.mean(0)) ** 2).sum()
    return {
        "explained_variance": float(1 - ((x - x_hat) ** 2).sum() / total),
        "l0_mean": float((feats != 0).sum(-1).float().mean()),
        "cos_mean": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "mse": float(((x - x_hat) ** 2).sum(-1).mean()),
    }


__all__ = ["evaluate"]
