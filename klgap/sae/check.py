"""What every loaded SAE must be before a run uses it, whichever loader made it (loading.load_sae and SAE
objects from Python): an SAE of one site (not a transcoder, which maps one site to another) with finite weights
(:func:`klgap.forward.finite.check_sae_finite`)."""

from __future__ import annotations

from klgap.errors import KlgapError
from klgap.forward.finite import check_sae_finite, named_tensors
from klgap.protocols import LoadedSAE

#: tensors only a transcoder has: a skip connection, and no reconstruction of its own input
TRANSCODER_TENSORS = ("W_skip",)


def check_loaded_sae(sae: LoadedSAE) -> None:
    """Refuse a transcoder (``W_skip``, or an architecture sae_lens calls one) and non-finite weights."""
    skip = [name for name, _ in named_tensors(sae.module) if name.rsplit(".", 1)[-1] in TRANSCODER_TENSORS]
    if skip or "transcoder" in sae.architecture.lower():
        what = f"{sae.architecture}" + (f", with a skip connection {skip[0]}" if skip else "")
        raise KlgapError(f"the SAE {sae.source!r} is a transcoder ({what}): it predicts another site's activations "
                         "from this one, so a site cannot be replaced by its reconstruction; klgap measures SAEs "
                         "that reconstruct their own input (x ≈ decode(encode(x)))")
    check_sae_finite(sae)


__all__ = ["TRANSCODER_TENSORS", "check_loaded_sae"]
