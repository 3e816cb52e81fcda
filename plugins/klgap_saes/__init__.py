"""Built-in SAE loaders: sae_lens pretrained releases, sae_lens folders on disk, plain safetensors files."""

from __future__ import annotations

import klgap
from klgap_saes.disk import SaeLensDiskLoader, SafetensorsLoader, save_safetensors_sae
from klgap_saes.pretrained import SaeLensPretrainedLoader

__all__ = ["save_safetensors_sae"]


@klgap.hookimpl
def register_sae_loaders(register):
    register("sae_lens", SaeLensPretrainedLoader())
    register("sae_lens_disk", SaeLensDiskLoader())
    register("safetensors", SafetensorsLoader())
