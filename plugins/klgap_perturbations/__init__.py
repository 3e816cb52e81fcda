"""klgap's built-in perturbations (METHOD.md §1): sae, sae_norm_corrected, sae_norm, epsilon_random,
theta_random, theta_random_xnorm, cosine_matched, identity, zero, mean_ablation, and two baselines for anisotropic
activation spaces: epsilon_anisotropic and sae_error_shuffled.

The formulas themselves are plain functions in :mod:`klgap_perturbations.geometry`.
"""

from __future__ import annotations

import klgap
from klgap_perturbations.perturbations import FACTORIES, FormulaPerturbation

__all__ = ["FACTORIES", "FormulaPerturbation", "register_perturbations"]


@klgap.hookimpl
def register_perturbations(register) -> None:
    """Register every factory in :data:`FACTORIES` under its name."""
    for name, (factory, description) in FACTORIES.items():
        register(name, factory, description)
