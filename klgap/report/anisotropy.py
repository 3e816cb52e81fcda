"""How anisotropic the activations at a site are, and the SAE's explained variance without their top directions
(issue 30): residual streams carry a large mean offset and a few dominant directions, and an explained variance
pooled over all directions can be mostly about those.

From the parts' side sums (klgap/job/view.py: ``sum_x``, ``sum_sq_x``, ``n`` and, per batch of at least
``PCA_MIN_ROWS`` measured rows, :func:`klgap.job.view.anisotropy_sides`). One function per fact:

- :func:`mean_offset_share`:   ‖x̄‖² / mean ‖x‖², x̄ the mean over the run's measured tokens;
- :func:`top_pc_share`:        λ₁ / Σλ, the first principal component's share of the variance (per batch, pooled);
- :func:`ev_without_top_pcs`:  1 − Σ‖P⊥e‖² / Σ‖P⊥(x − x̄_B)‖², P⊥ the projection off the batch's top principal
                               components (the first alone, or the fewest explaining PCA_SHARE of the variance);
- :func:`pcs_removed`:         the fewest-for-PCA_SHARE k, smallest and largest over the batches.

The principal components are each batch's own (its scatter's eigenvectors, x̄_B its mean), as sae_lens's legacy
explained variance takes a batch's mean, so these numbers depend on --batch-size a little; single-token and
many-samples batches (one row per context) are too small to estimate them and give None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np


def mean_offset_share(sides: Sequence[dict[str, Any]]) -> float | None:
    """‖x̄‖² / (Σ‖x‖² / n) over the run's measured tokens (x as the SAE sees it); None without tokens."""
    n = sum(s["n"] for s in sides)
    total = math.fsum(s["sum_sq_x"] for s in sides)
    if n == 0 or total <= 0:
        return None
    mean = np.sum([np.asarray(s["sum_x"], dtype=np.float64) for s in sides], axis=0) / n
    return math.fsum((mean * mean).tolist()) / (total / n)


def _pca(sides: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in sides if "pca_scatter" in s]


def top_pc_share(sides: Sequence[dict[str, Any]]) -> float | None:
    """Σ_B λ₁(B) / Σ_B Σλ(B): the first principal component's share of the variance around each batch's mean;
    None without a batch large enough."""
    found = _pca(sides)
    total = math.fsum(s["pca_scatter"] for s in found)
    return math.fsum(s["pca_top1"] for s in found) / total if found and total > 0 else None


def ev_without_top_pcs(sides: Sequence[dict[str, Any]], which: Literal["top1", "topk"]) -> float | None:
    """1 − Σ_B (Σ‖e‖² − Σ‖Vᵀe‖²) / Σ_B (Σ‖x − x̄_B‖² − Σ top λ): the explained variance in the directions left when
    each batch's top principal components V (``top1``: the first; ``topk``: the fewest explaining PCA_SHARE) are
    removed from x and from the error alike; None without a batch large enough."""
    found = _pca(sides)
    left = math.fsum(s["pca_scatter"] - s[f"pca_{which}"] for s in found)
    if not found or left <= 0:
        return None
    return 1.0 - math.fsum(s["sum_sq_err"] - s[f"pca_err_{which}"] for s in found) / left


def pcs_removed(sides: Sequence[dict[str, Any]]) -> tuple[int, int] | None:
    """(smallest, largest) over the batches of k, the fewest principal components explaining PCA_SHARE of the
    batch's variance; None without a batch large enough."""
    found = [int(s["pca_k"]) for s in _pca(sides)]
    return (min(found), max(found)) if found else None


__all__ = ["ev_without_top_pcs", "mean_offset_share", "pcs_removed", "top_pc_share"]
