"""The plain safetensors SAE file: its tensor names and its writer (the ``safetensors`` SAE loader reads it).

One file of ``W_enc [d_in d_sae]``, ``W_dec [d_sae d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` (+ ``threshold
[d_sae]`` for a JumpReLU SAE), float32, with ``hook_name`` / ``model_name`` in the safetensors metadata. The core
owns the format so that :mod:`klgap.testing` (and users converting their SAEs) can write it without importing
a plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

#: tensors every plain SAE file holds; ``threshold`` is optional (JumpReLU).
REQUIRED = ("W_enc", "W_dec", "b_enc", "b_dec")
THRESHOLD = "threshold"
#: a skip transcoder's skip connection ``W_skip [d_out d_in]`` (a plain transcoder file: W_dec is [d_sae d_out],
#: b_dec [d_out], and hook_name names the MLP's input, ``blocks.L.ln2.hook_normalized``)
SKIP = "W_skip"
HOOK_OUT = "hook_name_out"
#: safetensors metadata keys the loader reads.
METADATA = ("hook_name", "model_name")
#: a transcoder's metadata key: the hook it writes (``blocks.L.hook_mlp_out``); hook_name is then the one it reads


def save_safetensors_sae(path: str | Path, W_enc: Tensor, W_dec: Tensor, b_enc: Tensor, b_dec: Tensor,
                         threshold: Tensor | None = None, hook_name: str | None = None,
                         model_name: str | None = None, W_skip: Tensor | None = None,
                         hook_name_out: str | None = None) -> Path:
    """Write an SAE (or a transcoder: `hook_name_out` the hook it writes, `hook_name` the MLP's input it reads,
    W_dec [d_sae d_out], `W_skip` for a skip transcoder) in the plain format (float32, contiguous, on CPU)."""
    from safetensors.torch import save_file

    tensors = dict(zip(REQUIRED, (W_enc, W_dec, b_enc, b_dec), strict=True))
    if threshold is not None:
        tensors[THRESHOLD] = threshold
    if W_skip is not None:
        tensors[SKIP] = W_skip
    metadata = {k: v for k, v in zip(METADATA, (hook_name, model_name), strict=True) if v}
    if hook_name_out:
        metadata[HOOK_OUT] = hook_name_out
    save_file({k: v.detach().contiguous().float().cpu() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return Path(path)


__all__ = ["HOOK_OUT", "METADATA", "REQUIRED", "SKIP", "THRESHOLD", "save_safetensors_sae"]
