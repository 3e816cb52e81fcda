"""The interventions of a transcoder run (klgap/sae/transcoder.py): a transcoder at layer L writes mlp_out from
mlp_in, so x is the true MLP output, x̂ the transcoder's output and ε = ‖x − x̂‖ its error.

``transcoder``, ``transcoder_norm_corrected``, ``mlp_zero`` and ``mlp_mean_ablation`` are the names a transcoder
run asks for ``sae``, ``sae_norm_corrected``, ``zero`` and ``mean_ablation`` by: they build the same perturbation,
whose rows keep its name (``sae`` is the substitute under test in every report, ratio and baseline panel, whichever
substitute it is). ``epsilon_random`` and the other baselines are asked for by their own names: they work around x
with the transcoder's ε as they do with an SAE's. ``transcoder_no_skip`` is a skip transcoder's output without its
skip term (klgap.protocols.SkipFreePerturbation), so a run shows what the skip contributes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klgap_perturbations import geometry
from klgap_perturbations.params import check_names
from klgap_perturbations.perturbations import FACTORIES, FormulaPerturbation


def transcoder_no_skip(**params: Any) -> FormulaPerturbation:
    """x' = x̂ − x_in·W_skipᵀ: a skip transcoder's output without its skip term."""
    check_names("transcoder_no_skip", params, ())
    return FormulaPerturbation("transcoder_no_skip", lambda x, x_hat, generator: geometry.sae(x, x_hat), False,
                               {"norm": "x_hat"}, "x' = the skip transcoder's output without its skip term "
                               "(x̂ − x_in·W_skipᵀ)", without_skip=True)


#: name -> (factory, one-line description); the aliases build the perturbation of the name they stand for.
TRANSCODER_FACTORIES: dict[str, tuple[Callable[..., FormulaPerturbation], str]] = {
    "transcoder": (FACTORIES["sae"][0], "a transcoder's mlp_out from mlp_in (= sae: its rows are named sae)"),
    "transcoder_norm_corrected": (FACTORIES["sae_norm_corrected"][0],
                                  "the transcoder's output at the true MLP output's norm (= sae_norm_corrected)"),
    "transcoder_no_skip": (transcoder_no_skip, "a skip transcoder's output without its skip term W_skip·x_in"),
    "mlp_zero": (FACTORIES["zero"][0], "mlp_out = 0: the MLP zero-ablated (= zero, at every position)"),
    "mlp_mean_ablation": (FACTORIES["mean_ablation"][0], "mlp_out = its mean (= mean_ablation; over=batch|run)"),
}

__all__ = ["TRANSCODER_FACTORIES", "transcoder_no_skip"]
