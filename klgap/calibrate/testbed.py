"""A planted-truth testbed for the baselines (issue 37 item 3, first part): where the truth is known, which baseline
calls a harmless error pathological and which one finds a harmful one?

The testbed, per seed (CPU-sized, no language model):

- activations x ∈ R^d from known features: sae_lens's synthetic data module (``SyntheticModel``: Zipfian firing
  probabilities, unit magnitudes, no bias), its feature directions D ``[n_features d]`` orthonormalised, with
  n_features < d so that an orthogonal complement exists;
- a readout model with thresholded read-offs (error correction): r = relu(D x − θ), logits = U r, so the model is
  sensitive exactly in the directions of the features (a change below θ in an inactive feature's direction, or
  one orthogonal to every feature, changes nothing);
- planted errors e of a matched size ‖e‖ = ``error_frac`` · ‖x‖ per token, of three geometries: ``aligned`` (a
  random combination of the token's active features' directions: harmful), ``orthogonal`` (a random direction
  orthogonal to every feature: harmless, KL = 0) and ``random`` (isotropic: distributed as the isotropic baseline,
  so neither);
- each baseline at the same per-token size: ``isotropic`` (klgap's epsilon_random), ``covariance`` (a direction
  drawn from N(0, Σ_x), Σ_x fitted on separate tokens: epsilon_anisotropic) and ``shuffled`` (another token's
  planted error direction: sae_error_shuffled).

With ``sae_samples`` an SAE trained on the testbed's activations (sae_lens's toy trainer) adds a fourth error, its
own x̂ − x at its own per-token size (the geometry ``sae``), with the share of its energy in the features' span.

A baseline *calls* the planted error pathological when the context-bootstrap interval of KL(error)/KL(baseline)
(klgap.report.stats.ratio_of_means_ci, tokens grouped in contexts of :data:`CONTEXT`) lies above 1, benign when it
lies below 1. Over seeds: the false-positive rate is how often the ``random`` error is called pathological (it is
not: it is noise of the baseline's size), the power how often the ``aligned`` one is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from klgap.report import stats

GEOMETRIES = ("aligned", "orthogonal", "random")
BASELINES = ("isotropic", "covariance", "shuffled")
CONTEXT = 32  # tokens per bootstrap unit (the tokens are independent draws)


@dataclass(frozen=True)
class Settings:
    """One testbed's sizes."""

    d: int = 64
    n_features: int = 32
    vocab: int = 64
    tokens: int = 4096
    error_frac: float = 0.3  # ‖e‖ / ‖x‖ per token
    threshold: float = 0.5  # θ of the read-offs (features fire at magnitude 1)
    n_boot: int = 1000
    sae_samples: int = 0  # > 0: an SAE (sae_lens's trainer) trained on this many activations gives the ``sae`` row


@dataclass(frozen=True)
class Readout:
    """The known model: features D ``[n d]`` (orthonormal rows), read-off threshold θ and unembedding U ``[V n]``."""

    features: Tensor
    threshold: float
    unembed: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``x [m d]`` -> ``[m V]``."""
        return torch.relu(x @ self.features.T - self.threshold) @ self.unembed.T


def synthetic(settings: Settings, seed: int) -> tuple[Tensor, Tensor, Readout]:
    """(measured activations ``[tokens d]``, separate activations for fitting Σ_x, the readout model) of one seed."""
    x, fit, readout, _ = synthetic_model(settings, seed)
    return x, fit, readout


def synthetic_model(settings: Settings, seed: int) -> tuple[Tensor, Tensor, Readout, Any]:
    """:func:`synthetic` and the sae_lens SyntheticModel that drew them (an SAE trains on its activations)."""
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

    torch.manual_seed(seed)  # sae_lens's samplers draw from the global generator
    model = SyntheticModel(SyntheticModelConfig(num_features=settings.n_features, hidden_dim=settings.d, bias=False,
                                                seed=seed))
    with torch.no_grad():
        q, _ = torch.linalg.qr(model.feature_dict.feature_vectors.detach().double().T)  # [d n], orthonormal columns
        model.feature_dict.feature_vectors.copy_(q.T.to(model.feature_dict.feature_vectors.dtype))
        x = model.sample(settings.tokens).double()
        fit = model.sample(settings.tokens).double()
    gen = torch.Generator().manual_seed(seed)
    unembed = torch.randn(settings.vocab, settings.n_features, generator=gen, dtype=torch.float64) * 2.0
    return x, fit, Readout(q.T.contiguous(), settings.threshold, unembed), model


def trained_sae_error(model: Any, x: Tensor, settings: Settings, seed: int) -> tuple[Tensor, float, float]:
    """An SAE (2 × n_features latents, L1 3e-2) trained by sae_lens's toy trainer on `settings.sae_samples`
    activations of `model`: (its error x̂ − x on the measured ``x [m d]``, its explained variance there, the share
    of its error's energy in the features' span)."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.synthetic.training import train_toy_sae

    torch.manual_seed(seed)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=settings.d, d_sae=2 * settings.n_features,
                                                        l1_coefficient=3e-2, device="cpu", dtype="float32"))
    train_toy_sae(sae, model.feature_dict, model.activation_generator, training_samples=settings.sae_samples,
                  batch_size=1024, lr=3e-3)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x.float())).double()
    error = x_hat - x
    features = model.feature_dict.feature_vectors.detach().double()
    explained = 1 - float((error**2).sum() / ((x - x.mean(0)) ** 2).sum())
    in_span = float(((error @ features.T) ** 2).sum() / (error**2).sum())  # the rows are orthonormal
    return error, explained, in_span


def kl(readout: Readout, x: Tensor, x_prime: Tensor) -> Tensor:
    """KL(P(x) || P(x')) per token ``[m]`` (float64)."""
    logp, logq = torch.log_softmax(readout.logits(x), -1), torch.log_softmax(readout.logits(x_prime), -1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)  # exactly 0 where x' reads off as x


def unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def planted(geometry: str, x: Tensor, readout: Readout, gen: torch.Generator) -> Tensor:
    """Unit error directions ``[m d]`` of `geometry` (see the module's docstring)."""
    m, d = x.shape
    if geometry == "random":
        return unit(torch.randn(m, d, generator=gen, dtype=x.dtype))
    features = readout.features  # [n d]
    if geometry == "orthogonal":
        v = torch.randn(m, d, generator=gen, dtype=x.dtype)
        return unit(v - (v @ features.T) @ features)
    active = (x @ features.T > readout.threshold).to(x.dtype)  # [m n]
    weights = torch.randn(m, features.shape[0], generator=gen, dtype=x.dtype) * active
    none = active.sum(-1) == 0  # a token with no active feature: any feature's direction
    weights[none] = torch.randn(int(none.sum()), features.shape[0], generator=gen, dtype=x.dtype)
    return unit(weights @ features)


def baseline(name: str, x: Tensor, fit: Tensor, error_dirs: Tensor, gen: torch.Generator) -> Tensor:
    """Unit directions ``[m d]`` of baseline `name`."""
    m, d = x.shape
    if name == "isotropic":
        return unit(torch.randn(m, d, generator=gen, dtype=x.dtype))
    if name == "covariance":
        centred = fit - fit.mean(0)
        cov = centred.T @ centred / (len(fit) - 1)
        root = torch.linalg.cholesky(cov + 1e-9 * torch.eye(d, dtype=x.dtype) * cov.trace() / d)
        return unit(torch.randn(m, d, generator=gen, dtype=x.dtype) @ root.T)
    if name == "shuffled":
        return error_dirs[torch.randperm(m, generator=gen)]
    raise ValueError(name)


def per_context(values: Tensor) -> pd.DataFrame:
    """Per-context ``sum`` and ``n`` of per-token values (contexts of :data:`CONTEXT` tokens)."""
    context = np.arange(len(values)) // CONTEXT
    frame = pd.DataFrame({"context": context, "v": values.numpy()})
    grouped = frame.groupby("context")["v"]
    return pd.DataFrame({"sum": grouped.sum(), "n": grouped.count()})


@dataclass(frozen=True)
class Call:
    """One seed's verdict of one baseline on one planted geometry."""

    seed: int
    geometry: str
    baseline: str
    ratio: float
    ci_low: float
    ci_high: float

    @property
    def verdict(self) -> str:
        if self.ci_low > 1:
            return "pathological"
        if self.ci_high < 1:
            return "benign"
        return "undecided"


@dataclass(frozen=True)
class SaeFacts:
    """One seed's trained SAE: its explained variance and the share of its error's energy in the features' span."""

    seed: int
    explained_variance: float
    error_in_feature_span: float


def run_seed(settings: Settings, seed: int) -> tuple[list[Call], SaeFacts | None]:
    """Every (geometry, baseline) call of one seed (with ``sae_samples``, the trained SAE's error's too: geometry
    ``sae`` at its own per-token size), and the SAE's facts."""
    x, fit, readout, model = synthetic_model(settings, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    errors = [(geometry, settings.error_frac * x.norm(dim=-1, keepdim=True) * planted(geometry, x, readout, gen))
              for geometry in GEOMETRIES]
    facts = None
    if settings.sae_samples > 0:
        error, explained, in_span = trained_sae_error(model, x, settings, seed)
        errors.append(("sae", error))
        facts = SaeFacts(seed, explained, in_span)
    calls = []
    for geometry, error in errors:
        size, dirs = error.norm(dim=-1, keepdim=True), unit(error)
        error_kl = per_context(kl(readout, x, x + error))
        for name in BASELINES:
            base_kl = per_context(kl(readout, x, x + size * baseline(name, x, fit, dirs, gen)))
            found = stats.ratio_of_means_ci(error_kl, base_kl, n_boot=settings.n_boot, seed=seed)
            calls.append(Call(seed, geometry, name, found["ratio"], found["ci_low"], found["ci_high"]))
    return calls, facts


__all__ = ["BASELINES", "CONTEXT", "Call", "GEOMETRIES", "Readout", "SaeFacts", "Settings", "baseline", "kl",
           "planted", "run_seed", "synthetic", "synthetic_model", "trained_sae_error"]
