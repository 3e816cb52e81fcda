"""Turn a sae_lens SAE into a klgap LoadedSAE (eval, float32, on the device, hook_z reshaping off)."""

from __future__ import annotations

from typing import Any

import torch

from klgap.protocols import LoadedSAE


def wrap_sae_lens(sae: Any, source: str, device: torch.device, info: dict[str, Any] | None = None) -> LoadedSAE:
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
        info={"metadata": meta, **(info or {})},
    )
