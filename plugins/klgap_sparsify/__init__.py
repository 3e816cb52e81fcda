"""EleutherAI `sparsify` SAEs: the per-hookpoint folder `SparseCoder.save_to_disk` writes (cfg.json + sae.safetensors).

The weights are put into a sae_lens ``TopKSAE`` (a small subclass for the ``groupmax`` activation) with the same
math as sparsify's ``SparseCoder.encode``/``decode``; see :mod:`klgap_sparsify.loader`.
"""

from __future__ import annotations

import klgap
from klgap_sparsify.loader import SparsifyLoader, hook_name_for_hookpoint

__all__ = ["SparsifyLoader", "hook_name_for_hookpoint", "register_sae_loaders"]


@klgap.hookimpl
def register_sae_loaders(register) -> None:
    register("sparsify", SparsifyLoader())
