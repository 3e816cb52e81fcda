"""Built-in SAE loaders: sae_lens pretrained releases, sae_lens folders on disk, plain safetensors files.

:mod:`klgap_saes.convert` is the one path from a checkpoint's files to a sae_lens SAE that every file format
shares (this plugin's plain safetensors file, ``klgap_sparsify``, ``klgap_dictionary_learning``).
"""

from __future__ import annotations

import klgap
from klgap.sae.file import save_safetensors_sae
from klgap_saes.disk import SaeLensDiskLoader, SafetensorsLoader
from klgap_saes.pretrained import SaeLensPretrainedLoader

__all__ = ["SaeLensDiskLoader", "SaeLensPretrainedLoader", "SafetensorsLoader", "register_commands", "register_sae_loaders",
           "save_safetensors_sae",
           "wrap_sae"]


@klgap.hookimpl
def register_sae_loaders(register):
    register("sae_lens", SaeLensPretrainedLoader())
    register("sae_lens_disk", SaeLensDiskLoader())
    register("safetensors", SafetensorsLoader())


@klgap.hookimpl
def wrap_sae(sae, device):
    """A sae_lens SAE the user holds (trained or loaded in a notebook), for ``klgap.measure``."""
    if not type(sae).__module__.startswith("sae_lens"):  # never import sae_lens for another object
        return None
    from klgap_saes.common import trained_centred, wrap_sae_lens

    return wrap_sae_lens(sae, f"in memory: sae_lens {type(sae).__name__}", device, {"in_memory": True},
                         center_resid=trained_centred(sae))


@klgap.hookimpl
def register_commands(register):
    """``klgap saes``: the pretrained SAEs sae_lens's bundled directory knows for a model (offline)."""
    from klgap_saes.listing import SaesCommand

    register("saes", SaesCommand(), SaesCommand.description)
