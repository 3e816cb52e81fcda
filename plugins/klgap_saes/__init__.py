"""Built-in SAE loaders: sae_lens pretrained releases, sae_lens folders on disk, plain safetensors files.

:mod:`klgap_saes.convert` is the one path from a checkpoint's files to a sae_lens SAE that every file format
shares (this plugin's plain safetensors file, ``klgap_sparsify``, ``klgap_dictionary_learning``).
"""

from __future__ import annotations

import klgap
from klgap.saefile import save_safetensors_sae
from klgap_saes.disk import SaeLensDiskLoader, SafetensorsLoader
from klgap_saes.pretrained import SaeLensPretrainedLoader

__all__ = ["SaeLensDiskLoader", "SaeLensPretrainedLoader", "SafetensorsLoader", "register_sae_loaders", "save_safetensors_sae"]


@klgap.hookimpl
def register_sae_loaders(register):
    register("sae_lens", SaeLensPretrainedLoader())
    register("sae_lens_disk", SaeLensDiskLoader())
    register("safetensors", SafetensorsLoader())
