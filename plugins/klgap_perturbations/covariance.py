"""Second-moment statistics of a site's activations (or of the SAE's error), fitted once per run in float64.

:class:`Covariance` is what the covariance-shaped baselines are drawn from (``epsilon_anisotropic``,
``cov_random_mixture``, ``epsilon_error_cov``), what ``epsilon_mahalanobis`` measures size in and what
``pca_matched`` projects on; :func:`error_offset` splits the SAE's error into its constant part ē and the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

#: below this a variance counts as zero (float32 tiny, as klgap_perturbations.geometry)
TINY = torch.finfo(torch.float32).tiny
#: a covariance whose top eigenvalue holds more than this share of the total variance is flagged nearly degenerate
DEGENERATE_SHARE = 0.5


@dataclass(frozen=True)
class Covariance:
    """The centred empirical covariance of ``n`` rows: ``mean [d]`` and ``cov [d d]`` (float64, divided by n − 1)."""

    mean: Tensor  # [d] float64
    cov: Tensor  # [d d] float64
    n: int

    @classmethod
    def of(cls, rows: Tensor) -> Covariance:
        """``rows: [n >= 2, d]`` -> their mean and centred covariance, in float64."""
        if rows.dim() != 2 or rows.shape[0] < 2:
            raise ValueError(f"a covariance needs [n >= 2, d] rows, got {tuple(rows.shape)}")
        rows = rows.double()
        mean = rows.mean(0, keepdim=True)
        centred = rows - mean
        return cls(mean[0], centred.T @ centred / max(1, rows.shape[0] - 1), int(rows.shape[0]))

    @property
    def d(self) -> int:
        return int(self.cov.shape[0])

    def ridge_abs(self, ridge: float) -> float:
        """The absolute ridge λ = ridge · (mean variance) = ridge · tr Σ / d."""
        return ridge * float(self.cov.diagonal().mean().clamp_min(TINY))

    def regularised(self, ridge: float) -> Tensor:
        """Σ + λ I, λ = :meth:`ridge_abs` ``(ridge)``: ``[d d]`` float64."""
        return self.cov + self.ridge_abs(ridge) * torch.eye(self.d, dtype=self.cov.dtype, device=self.cov.device)

    @cached_property
    def eigen(self) -> tuple[Tensor, Tensor]:
        """(values ``[d]`` descending, clipped at 0; vectors ``[d d]``, column i the i-th principal axis) of Σ."""
        values, vectors = torch.linalg.eigh(self.cov)
        return values.flip(0).clamp_min(0.0), vectors.flip(1)

    def factor(self, ridge: float = 1e-6) -> Tensor:
        """L ``[d d]`` float32 with L Lᵀ = Σ + λ I (eigendecomposition, negative round-off clipped): L z ~ N(0, Σ + λI)
        for z ~ N(0, I)."""
        values, vectors = torch.linalg.eigh(self.regularised(ridge))
        return (vectors * values.clamp_min(0.0).sqrt()).float()

    def inverse_sqrt(self, ridge: float) -> Tensor:
        """W ``[d d]`` float32, symmetric, with W W = (Σ + λ I)⁻¹: ‖W v‖ is v's Mahalanobis length."""
        values, vectors = torch.linalg.eigh(self.regularised(ridge))
        return ((vectors / values.clamp_min(TINY).sqrt()) @ vectors.T).float()

    @property
    def top_share(self) -> float:
        """The largest eigenvalue's share of the total variance (1/d when isotropic, 1 when rank one; 0 when Σ = 0)."""
        values = self.eigen[0]
        total = float(values.sum())
        return float(values[0]) / total if total > 0 else 0.0

    def explained(self) -> Tensor:
        """``[d]`` float64: the share of the total variance in the top 1, 2, …, d principal components."""
        values = self.eigen[0]
        total = values.sum()
        return values.cumsum(0) / total if float(total) > 0 else torch.ones_like(values)

    def summary(self, prefix: str = "") -> dict[str, float | bool]:
        """``{prefix}top_eigenvalue_share`` and ``{prefix}nearly_degenerate`` (that share above DEGENERATE_SHARE)."""
        share = self.top_share
        return {f"{prefix}top_eigenvalue_share": share, f"{prefix}nearly_degenerate": share > DEGENERATE_SHARE}


@dataclass(frozen=True)
class ErrorOffset:
    """The SAE's error e = x − x̂ over fit tokens split into its constant part ē (the mean) and the rest e − ē.

    Σ‖e‖²/n = ‖ē‖² + Σ‖e − ē‖²/n, so ``energy_share`` = ‖ē‖² / mean ‖e‖² is the constant part's share of
    the squared error and ``norm_frac`` = ‖ē‖ / sqrt(mean ‖e‖²) its square root (‖ē‖ over the RMS error)."""

    mean: Tensor  # [d] float64: ē
    norm: float  # ‖ē‖
    rms: float  # sqrt(mean ‖e‖²)

    @property
    def norm_frac(self) -> float:
        return self.norm / self.rms if self.rms > 0 else 0.0

    @property
    def energy_share(self) -> float:
        return self.norm_frac**2

    def summary(self) -> dict[str, float]:
        return {"error_offset_norm": self.norm, "error_rms": self.rms, "error_offset_frac": self.norm_frac,
                "error_offset_energy_share": self.energy_share}


def error_offset(x: Tensor, x_hat: Tensor) -> ErrorOffset:
    """ē and the sizes of e = x − x̂ (``x, x_hat: [n d]``), in float64."""
    err = x.double() - x_hat.double()
    mean = err.mean(0)
    return ErrorOffset(mean, float(mean.norm()), float(err.pow(2).sum(-1).mean().sqrt()))
