"""The intervention formulas as plain functions (METHOD.md §1), computed per token.

Every function takes ``x, x_hat: [n, d]`` and returns ``x_prime: [n, d]`` float32 (inputs in a
lower precision are upcast first). Random functions draw only from `generator`, which must live on
x's device. Degenerate tokens never give NaN:

- ``‖x̂‖ = 0``: `sae_norm_corrected` returns 0 (no direction to rescale);
- ``‖x‖ = 0``: `sae_norm` returns 0; `theta_random` / `cosine_matched` use a random unit direction
  with norm r (their cosine with x is then undefined), and cos(x, x̂) is taken as 0;
- ``ε = 0``: `epsilon_random` returns x exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from klgap_perturbations.covariance import Covariance

#: below this a norm counts as zero (float32 tiny is ~1.2e-38; squares of normal activations never get here).
_TINY = torch.finfo(torch.float32).tiny


def as_float32(t: Tensor) -> Tensor:
    """`t` in float32 at least (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def row_norm(x: Tensor) -> Tensor:
    """``x: [n, d]`` -> per-token L2 norm ``[n, 1]``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, with 0 where den is 0 (shapes broadcast)."""
    ok = den > _TINY
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def unit(x: Tensor) -> Tensor:
    """``x: [n, d]`` scaled to unit norm per row; zero rows stay zero."""
    return x * safe_ratio(torch.ones_like(row_norm(x)), row_norm(x))


def cosine(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token cos(x, x̂) ``[n, 1]`` in [-1, 1]; 0 where either vector is zero."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    return safe_ratio((x * x_hat).sum(-1, keepdim=True), row_norm(x) * row_norm(x_hat)).clamp(-1.0, 1.0)


def random_unit(n: int, d: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``[n, d]`` float32 rows uniform on the unit sphere (normalised Gaussians)."""
    g = torch.randn(n, d, generator=generator, device=device, dtype=torch.float32)
    return unit(g)


def random_orthogonal_unit(direction: Tensor, generator: torch.Generator) -> Tensor:
    """Rows uniform on the unit sphere orthogonal to each row of ``direction: [n, d]`` (unit or zero rows).

    A Gaussian with its component along `direction` removed is uniform on the orthogonal sphere once
    normalised. The projection is applied twice (Gram-Schmidt re-orthogonalisation) so that
    ``v · direction`` is at rounding level even in float32. A zero row gives a plain random unit vector.
    """
    n, d = direction.shape
    g = torch.randn(n, d, generator=generator, device=direction.device, dtype=torch.float32).to(direction.dtype)
    for _ in range(2):
        g = g - (g * direction).sum(-1, keepdim=True) * direction
    return unit(g)


def rotate_to_cosine(x: Tensor, cos: Tensor, r: Tensor, generator: torch.Generator) -> Tensor:
    """``x' = r · (cos·x/‖x‖ + sin·v)``, v a random unit vector ⟂ x; sin = sqrt(1 − cos²).

    x: [n, d]; cos, r: [n, 1] or scalars (cos is clamped to [-1, 1]). Where ‖x‖ = 0 a random unit
    direction stands in for x/‖x‖, so ‖x'‖ = r still holds. Two Gaussian draws of [n, d] are made
    whatever the data, so the random stream does not depend on which tokens are degenerate.
    """
    x = as_float32(x)
    n, d = x.shape
    cos = torch.as_tensor(cos, dtype=x.dtype, device=x.device).clamp(-1.0, 1.0)
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device)
    stand_in = random_unit(n, d, generator, x.device).to(x.dtype)
    x_norm = row_norm(x)
    e = torch.where(x_norm > _TINY, unit(x), stand_in)  # [n, d] unit rows
    v = random_orthogonal_unit(e, generator)
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(0.0))
    return (r * (cos * e + sin * v)).float()


# --------------------------------------------------------------------------- the interventions


def sae(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = x̂."""
    return as_float32(x_hat).float().clone()


def sae_norm_corrected(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = x̂ · ‖x‖/‖x̂‖ per token (0 where ‖x̂‖ = 0)."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    return (x_hat * safe_ratio(row_norm(x), row_norm(x_hat))).float()


def sae_norm(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = x · ‖x̂‖/‖x‖ per token (0 where ‖x‖ = 0)."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    return (x * safe_ratio(row_norm(x_hat), row_norm(x))).float()


def epsilon_random(x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    """x' = x + ε·u, ε = ‖x − x̂‖ per token, u uniform on the unit sphere (x exactly where ε = 0)."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    eps = row_norm(x - x_hat)
    u = random_unit(x.shape[0], x.shape[1], generator, x.device).to(x.dtype)
    return (x + eps * u).float()


def theta_random(x: Tensor, x_hat: Tensor, generator: torch.Generator, norm: str = "x_hat") -> Tensor:
    """Random x' with cos(x, x') = cos(x, x̂) per token and ‖x'‖ = ‖x̂‖ (`norm="x_hat"`) or ‖x‖ (`norm="x"`)."""
    if norm not in ("x_hat", "x"):
        raise ValueError(f"norm must be 'x_hat' or 'x', not {norm!r}")
    x, x_hat = as_float32(x), as_float32(x_hat)
    r = row_norm(x_hat) if norm == "x_hat" else row_norm(x)
    return rotate_to_cosine(x, cosine(x, x_hat), r, generator)


def cosine_matched(x: Tensor, x_hat: Tensor, generator: torch.Generator, cos: float, norm_frac: float) -> Tensor:
    """Random x' with cos(x, x') = `cos` and ‖x'‖ = `norm_frac`·‖x‖ per token (x̂ is not used)."""
    x = as_float32(x)
    return rotate_to_cosine(x, cos, norm_frac * row_norm(x), generator)


def identity(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = x (a control: KL must be 0)."""
    return as_float32(x).float().clone()


def zero(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = 0 (zero ablation)."""
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device)


def mean_ablation(x: Tensor, x_hat: Tensor) -> Tensor:
    """x' = the mean of x over the call's tokens, the same row for every token (mean ablation).

    In all-token mode a call holds every patched token of a batch, so this is the batch's mean activation over
    its tokens, as the study's ``mean_ablation_hook`` (error_eval.py: ``activation.mean((0, 1))``); in
    single-token and many-samples modes it is the mean over the batch's contexts at the patched position.
    """
    mean = as_float32(x).mean(0, keepdim=True)  # [1, d], float64 stays float64 until the end
    return mean.expand(x.shape[0], -1).float().clone()


def fixed_mean(x: Tensor, mean: Tensor) -> Tensor:
    """x' = `mean` ``[d]`` (fitted once, e.g. over a run's fit tokens) for every token of ``x [n, d]``."""
    if mean.shape != (x.shape[1],):
        raise ValueError(f"the mean was fitted on {tuple(mean.shape)} activations, not {x.shape[1]}-wide ones")
    return mean.to(device=x.device, dtype=torch.float32).expand(x.shape[0], -1).clone()


# --------------------------------------------------------------------------- baselines for anisotropic spaces


def covariance_factor(acts: Tensor, ridge: float = 1e-6) -> Tensor:
    """``acts: [n, d]`` -> L ``[d, d]`` with L Lᵀ = the centred empirical covariance (+ ridge·mean variance·I).

    Built from the eigendecomposition in float64 (negative round-off eigenvalues clipped), so a Gaussian
    z ~ N(0, I) gives L z ~ N(0, Σ): directions drawn where the activations actually vary.
    """
    return Covariance.of(acts).factor(ridge)


def epsilon_anisotropic(x: Tensor, x_hat: Tensor, generator: torch.Generator, factor: Tensor) -> Tensor:
    """x' = x + ε·u, u = L z/‖L z‖ with z ~ N(0, I): the SAE's L2 error ε, direction drawn from N(0, Σ)."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    if factor.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"the covariance was fitted on {factor.shape[0]}-wide activations, not {x.shape[1]}")
    eps = row_norm(x - x_hat)
    z = torch.randn(x.shape[0], x.shape[1], generator=generator, device=x.device, dtype=torch.float32)
    u = unit(z @ factor.to(device=x.device, dtype=torch.float32).T).to(x.dtype)
    return (x + eps * u).float()


def shuffle_partner(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """A random permutation of range(n) with no fixed point (a fixed point i takes i+1's partner); n=1 -> [0]."""
    perm = torch.randperm(n, generator=generator, device=device)
    if n < 2:
        return perm
    values = perm.tolist()
    for i in range(n):  # a fixed point swaps with the next row: both end up off the diagonal, others unchanged
        if values[i] == i:
            j = (i + 1) % n
            values[i], values[j] = values[j], values[i]
    return torch.tensor(values, dtype=perm.dtype, device=device)


def sae_error_shuffled(x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    """x' = x + ε_i · e_j/‖e_j‖: another token's SAE error direction e_j = x_j − x̂_j at this token's ε_i.

    Partners are a random derangement of the tokens in the call; where the partner's error is zero a random
    direction stands in (so ‖x' − x‖ = ε_i always holds).
    """
    x, x_hat = as_float32(x), as_float32(x_hat)
    err = x - x_hat
    eps = row_norm(err)
    stand_in = random_unit(x.shape[0], x.shape[1], generator, x.device).to(x.dtype)
    partner = err[shuffle_partner(x.shape[0], generator, x.device)]
    direction = torch.where(row_norm(partner) > _TINY, unit(partner), stand_in)
    return (x + eps * direction).float()
