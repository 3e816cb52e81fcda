"""klgap's built-in perturbations (METHOD.md §1): sae, sae_norm_corrected, sae_norm, epsilon_random,
theta_random, theta_random_xnorm, cosine_matched, identity, zero, mean_ablation, two baselines for anisotropic
activation spaces: epsilon_anisotropic and sae_error_shuffled, and the SAE's error split into its linear and nonlinear
parts (klgap_perturbations.decomposition): sae_plus_linear_error, sae_plus_nonlinear_error and their random twins
epsilon_random_nonlinear, epsilon_random_linear, and the baselines of issue 31 (klgap_perturbations.fitted):
cov_random_mixture, real_direction, epsilon_error_cov, epsilon_mahalanobis, the compressor controls pca_matched and
random_dictionary, and sae_minus_offset; and ``along``, a point of a length sweep along the SAE's error or a
baseline's direction (klgap_perturbations.sweep); and a transcoder run's names (klgap_perturbations.transcoders):
transcoder, transcoder_norm_corrected, transcoder_no_skip, mlp_zero, mlp_mean_ablation.

The formulas themselves are plain functions in :mod:`klgap_perturbations.geometry`.
"""

from __future__ import annotations

import klgap
from klgap_perturbations.decomposition import DECOMPOSITION_FACTORIES
from klgap_perturbations.fitted import BASELINE_FACTORIES
from klgap_perturbations.perturbations import FACTORIES, FormulaPerturbation
from klgap_perturbations.sweep import SWEEP_FACTORIES
from klgap_perturbations.transcoders import TRANSCODER_FACTORIES

__all__ = ["BASELINE_FACTORIES", "DECOMPOSITION_FACTORIES", "FACTORIES", "FormulaPerturbation", "SWEEP_FACTORIES", "TRANSCODER_FACTORIES",
           "register_perturbations"]


@klgap.hookimpl
def register_perturbations(register) -> None:
    """Register every factory in :data:`FACTORIES`, :data:`DECOMPOSITION_FACTORIES`, :data:`BASELINE_FACTORIES` and
    :data:`SWEEP_FACTORIES` under its name."""
    for name, (factory, description) in {**FACTORIES, **DECOMPOSITION_FACTORIES, **BASELINE_FACTORIES,
                                         **SWEEP_FACTORIES, **TRANSCODER_FACTORIES}.items():
        register(name, factory, description)
