"""Turn a sae_lens SAE into a klgap LoadedSAE (eval, float32, on the device, hook_z reshaping off)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klgap.protocols import LoadedSAE
from klgap.sae.transcoder import READS, written_hook

if TYPE_CHECKING:
    import torch


def wrap_sae_lens(sae: Any, source: str, device: torch.device, info: dict[str, Any] | None = None,
                  center_resid: bool = False) -> LoadedSAE:
    """`sae` (any sae_lens SAE) frozen on `device` in float32; `info` is provenance for the report and
    `center_resid` says it was trained on mean-centred residual activations (LoadedSAE.center_resid)."""
    import torch

    sae = sae.to(device=device, dtype=torch.float32).eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    hook = sae.cfg.metadata.hook_name
    if hook is not None and str(hook).endswith("_z") and hasattr(sae, "turn_off_forward_pass_hook_z_reshaping"):
        sae.turn_off_forward_pass_hook_z_reshaping()  # klgap hands over flattened [n, n_heads*d_head]
    meta = {k: v for k, v in sae.cfg.metadata.to_dict().items() if isinstance(v, (str, int, float, bool, type(None)))}
    if is_transcoder(sae):  # reads mlp_in, writes mlp_out (klgap.sae.transcoder); its skip term kept apart
        params = dict(sae.named_parameters())
        skip = params["W_skip"].detach() if "W_skip" in params else None
        out_hook = sae.cfg.metadata.hook_name_out  # sae_lens's metadata answers None for a key it lacks
        return LoadedSAE(
            module=sae, d_in=int(sae.cfg.d_in), d_sae=int(sae.cfg.d_sae),
            hook_name=written_hook(hook, out_hook, f"the transcoder {source!r}"), source=source,
            architecture=sae.cfg.architecture(), info={"metadata": meta, **(info or {})},
            reads=READS, d_out=int(sae.cfg.d_out), skip=skip,
        )
    return LoadedSAE(
        module=sae,
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        hook_name=hook,
        source=source,
        architecture=sae.cfg.architecture(),
        center_resid=center_resid,
        info={"metadata": meta, **(info or {})},
    )


def is_transcoder(sae: Any) -> bool:
    """Whether a sae_lens SAE is one of its transcoders (Transcoder, SkipTranscoder, JumpReLUTranscoder,
    JumpReLUSkipTranscoder, and any subclass)."""
    from sae_lens.saes.transcoder import Transcoder

    return isinstance(sae, Transcoder)


def trained_centred(sae: Any) -> bool:
    """Whether a sae_lens SAE's own config says it was trained with TransformerLens's center_writing_weights
    (``metadata.model_from_pretrained_kwargs``, which sae_lens's training runner records)."""
    kwargs = sae.cfg.metadata.model_from_pretrained_kwargs
    return isinstance(kwargs, dict) and bool(kwargs.get("center_writing_weights"))
