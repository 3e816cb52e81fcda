"""Marks et al. `dictionary_learning` autoencoders: a trainer folder with ``ae.pt`` (state_dict) + ``config.json``.

Each supported ``dict_class`` is rebuilt as the sae_lens SAE with the same math (ReLU -> StandardSAE, TopK ->
TopKSAE, JumpReLU and BatchTopK at inference -> JumpReLUSAE, Gated -> GatedSAE); see
:mod:`klgap_dictionary_learning.loader`.
"""

from __future__ import annotations

import klgap
from klgap_dictionary_learning.loader import DICT_CLASSES, DictionaryLearningLoader, hook_name_for_submodule

__all__ = ["DICT_CLASSES", "DictionaryLearningLoader", "hook_name_for_submodule", "register_sae_loaders"]


@klgap.hookimpl
def register_sae_loaders(register) -> None:
    register("dictionary_learning", DictionaryLearningLoader())
