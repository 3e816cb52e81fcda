"""What every loaded SAE must be before a run uses it, whichever loader made it (loading.load_sae and SAE
objects from Python): finite weights (:func:`klgap.forward.finite.check_sae_finite`) and, for a transcoder (a
substitute that reads one site and writes another, klgap/sae/transcoder.py), what it reads and writes said."""

from __future__ import annotations

from klgap.errors import KlgapError
from klgap.forward.finite import check_sae_finite, named_tensors
from klgap.protocols import LoadedSAE

#: tensors only a transcoder has: a skip connection, and no reconstruction of its own input
TRANSCODER_TENSORS = ("W_skip",)


def check_loaded_sae(sae: LoadedSAE) -> None:
    """A transcoder (``W_skip``, an architecture sae_lens calls one) must say what it reads (``reads``), with a
    skip term as wide as it reads and writes; every SAE's weights must be finite."""
    skip = [name for name, _ in named_tensors(sae.module) if name.rsplit(".", 1)[-1] in TRANSCODER_TENSORS]
    if (skip or "transcoder" in sae.architecture.lower()) and not sae.transcoder:
        what = f"{sae.architecture}" + (f", with a skip connection {skip[0]}" if skip else "")
        raise KlgapError(f"the SAE {sae.source!r} is a transcoder ({what}), but its loader did not say which site "
                         "it reads (LoadedSAE.reads); a transcoder reads mlp_in and writes mlp_out")
    if sae.skip is not None and tuple(sae.skip.shape) != (sae.width_out, sae.d_in):
        raise KlgapError(f"the transcoder {sae.source!r} has W_skip of shape {tuple(sae.skip.shape)}, expected "
                         f"[d_out={sae.width_out}, d_in={sae.d_in}]")
    check_sae_finite(sae)


__all__ = ["TRANSCODER_TENSORS", "check_loaded_sae"]
