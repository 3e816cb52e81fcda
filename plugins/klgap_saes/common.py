"""Turn a sae_lens SAE into a klgap LoadedSAE (eval, float32, on the device, hook_z reshaping off)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from klgap.protocols import LoadedSAE

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


def trained_centred(sae: Any) -> bool:
    """Whether a sae_lens SAE's own config says it was trained with TransformerLens's center_writing_weights
    (``metadata.model_from_pretrained_kwargs``, which sae_lens's training runner records)."""
    kwargs = sae.cfg.metadata.model_from_pretrained_kwargs
    return isinstance(kwargs, dict) and bool(kwargs.get("center_writing_weights"))
