"""Read a sparsify hookpoint folder and rebuild its SAE as a sae_lens SAE with identical math.

What sparsify (eai-sparsify 1.3, ``sparsify/sparse_coder.py``, ``config.py``, ``fused_encoder.py``) writes and
computes, for one hookpoint folder ``CHECKPOINT/<hookpoint>/`` (``<hookpoint>/seedN/`` with several seeds):

- ``cfg.json``: the ``SparseCoderConfig`` fields (``activation`` "topk"|"groupmax", ``expansion_factor``,
  ``normalize_decoder``, ``num_latents`` (0: ``d_in * expansion_factor``), ``k``, ``multi_topk``,
  ``skip_connection``, ``transcode``) plus ``d_in``.
- ``sae.safetensors``: ``encoder.weight [num_latents, d_in]``, ``encoder.bias [num_latents]``,
  ``W_dec [num_latents, d_in]``, ``b_dec [d_in]`` (+ ``W_skip [d_in, d_in]`` with a skip connection).
- ``encode(x) = act(relu(encoder(x - b_dec)))`` (b_dec is subtracted unless ``transcode``), act = top-k
  over latents, or ``groupmax``: the max of each of k contiguous groups of ``num_latents / k`` latents;
  ``decode = Σ acts · W_dec[indices] + b_dec``.

sae_lens's ``TopKSAE`` with ``apply_b_dec_to_input=True`` computes ``relu(topk((x - b_dec) @ W_enc + b_enc))
@ W_dec + b_dec``. With ``W_enc = encoder.weight.T`` that is the same function: top-k then ReLU keeps the same
values as ReLU then top-k, and a latent that either zeroes adds nothing to the decode. So b_dec is subtracted
before the encoder in both and no bias needs folding. ``groupmax`` is a ``TopKSAE`` with sparsify's GroupMax
as its activation (:class:`GroupMax`). ``multi_topk`` only adds a training loss at 4k latents; inference uses k,
as ``SparseCoder.encode`` does. Weights stored in bfloat16 are computed in float32, like every klgap SAE.
Transcoders and skip connections are refused: klgap splices one SAE's reconstruction in at one site.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from klgap.errors import KlgapError
from klgap.protocols import LoadedSAE
from klgap.sites import hook_name
from klgap_saes.common import wrap_sae_lens

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")

# sparsify hookpoints are module names under the HF model's base_model: `layers.6` (Llama, GPT-NeoX),
# `h.6` (GPT-2), with `.mlp` / `.self_attn` / `.attn` / `.attention` for the sublayers; the SAE encodes the
# module's output (the first element of a tuple).
_HOOKPOINT = re.compile(
    r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(?P<layer>\d+)(?:\.(?P<part>mlp|self_attn|attn|attention))?$"
)
_SEED_DIR = re.compile(r"^seed\d+$")


def hook_name_for_hookpoint(hookpoint: str) -> str | None:
    """`layers.N` -> blocks.N.hook_resid_post, `layers.N.mlp` -> hook_mlp_out, `.self_attn` -> hook_attn_out."""
    match = _HOOKPOINT.match(hookpoint.strip())
    if match is None:
        return None
    part = match["part"]
    site = "resid_post" if part is None else ("mlp_out" if part == "mlp" else "attn_out")
    return hook_name(site, int(match["layer"]))


def hookpoint_of(path: Path) -> str:
    """The hookpoint a folder holds: its name, or its parent's for a `seedN` folder."""
    return path.parent.name if _SEED_DIR.match(path.name) else path.name


class SparsifyLoader:
    """One hookpoint folder of an EleutherAI sparsify checkpoint (SAE, TopK or GroupMax activation)."""

    description = (
        "an EleutherAI sparsify hookpoint folder: cfg.json + sae.safetensors (TopK/GroupMax; hook from the "
        "folder name: layers.N -> resid_post, layers.N.mlp -> mlp_out, layers.N.self_attn -> attn_out)"
    )

    def can_load(self, spec: str) -> bool:
        path = Path(spec).expanduser()
        return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise KlgapError(
                f"sparsify folder {spec!r} does not exist; pass a hookpoint folder holding {CFG} + {WEIGHTS} "
                "(e.g. CHECKPOINT/layers.6)"
            )
        for name in (CFG, WEIGHTS):
            if not (path / name).is_file():
                inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / CFG).is_file())
                hint = f"; it holds hookpoint folders {', '.join(inner)}: pass one of them" if inner else ""
                raise KlgapError(
                    f"sparsify folder {spec!r} has no {name}; a sparsify hookpoint folder holds {CFG} + {WEIGHTS}{hint}"
                )
        cfg = _read_cfg(path / CFG, spec)
        tensors = _read_weights(path / WEIGHTS, spec)
        hook = cfg.get("hook_name") or hook_name_for_hookpoint(hookpoint_of(path))
        sae, info = build_sae(cfg, tensors, hook, spec)
        loaded = wrap_sae_lens(sae, str(path), device, {"format": "sparsify", "hookpoint": hookpoint_of(path), **info})
        loaded.architecture = info["activation"]
        return loaded


def _read_cfg(file: Path, spec: str) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} holds a {type(cfg).__name__}, expected an object of SparseCoderConfig fields + d_in")
    return cfg


def _read_weights(file: Path, spec: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on a damaged file
        raise KlgapError(
            f"sparsify folder {spec!r}: {WEIGHTS} is not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from exc


def _cfg_int(cfg: dict[str, Any], key: str, spec: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} has {key}={value!r}; it must be a non-negative integer")
    return value


def build_sae(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], hook: str | None, spec: str):
    """A sae_lens TopKSAE (GroupMaxSAE for `groupmax`) computing what sparsify's SparseCoder computes."""
    from sae_lens import TopKSAE, TopKSAEConfig

    if cfg.get("transcode"):
        raise KlgapError(
            f"sparsify folder {spec!r} is a transcoder (transcode=true: it maps a module's input to its output); "
            "klgap measures SAEs, which reconstruct one site (transcode=false)"
        )
    if cfg.get("skip_connection") or "W_skip" in tensors:
        raise KlgapError(
            f"sparsify folder {spec!r} has a skip connection (W_skip), which klgap does not support; "
            "supported: sparsify SAEs with skip_connection=false"
        )
    activation = cfg.get("activation", "topk")
    if activation not in ACTIVATIONS:
        raise KlgapError(f"sparsify folder {spec!r}: unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    if "d_in" not in cfg:
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} has no d_in; sparsify's save_to_disk writes it beside the config fields")
    d_in = _cfg_int(cfg, "d_in", spec)
    if d_in == 0:
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} has d_in=0; it must be the width of the hookpoint's activations")
    num_latents = _cfg_int(cfg, "num_latents", spec, 0) or d_in * _cfg_int(cfg, "expansion_factor", spec, 32)
    k = _cfg_int(cfg, "k", spec, 32)
    if not 0 < k <= num_latents:
        raise KlgapError(f"sparsify folder {spec!r}: k={k} must be between 1 and num_latents={num_latents}")
    if activation == "groupmax" and num_latents % k:
        raise KlgapError(f"sparsify folder {spec!r}: groupmax needs num_latents ({num_latents}) divisible by k ({k})")

    expected = {
        "encoder.weight": (num_latents, d_in), "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_in), "b_dec": (d_in,),
    }
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise KlgapError(
            f"sparsify folder {spec!r}: {WEIGHTS} lacks {', '.join(missing)}; it needs {', '.join(expected)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise KlgapError(
                f"sparsify folder {spec!r}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                f"(d_in={d_in}, num_latents={num_latents} from {CFG})"
            )
    sae_cfg = TopKSAEConfig(
        d_in=d_in, d_sae=num_latents, k=k, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=False,
        dtype="float32", device="cpu",
    )
    sae_cfg.metadata.hook_name = hook
    sae = (groupmax_sae_class() if activation == "groupmax" else TopKSAE)(sae_cfg)
    sae.load_state_dict(
        {
            "W_enc": tensors["encoder.weight"].float().T.contiguous(),
            "b_enc": tensors["encoder.bias"].float(),
            "W_dec": tensors["W_dec"].float(),
            "b_dec": tensors["b_dec"].float(),
        },
        strict=True,
    )
    info = {
        "activation": activation, "k": k, "multi_topk": bool(cfg.get("multi_topk", False)),
        "normalize_decoder": bool(cfg.get("normalize_decoder", True)), "stored_dtype": str(tensors["W_dec"].dtype),
    }
    return sae, info


class GroupMax(nn.Module):
    """sparsify's `groupmax`: per group of `num_latents / k` contiguous latents keep the max of relu(pre)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = pre.relu().unflatten(-1, (self.k, -1)).max(dim=-1)
        idx = idx + torch.arange(0, pre.shape[-1], pre.shape[-1] // self.k, device=pre.device)
        return torch.zeros_like(pre).scatter_(-1, idx, values)


@lru_cache(maxsize=1)
def groupmax_sae_class() -> type:
    """A TopKSAE whose activation is sparsify's GroupMax (built on first use: importing sae_lens is slow)."""
    from sae_lens import TopKSAE

    class GroupMaxSAE(TopKSAE):
        """sparsify's groupmax SAE: TopKSAE's encoder, decoder and b_dec handling, GroupMax activation."""

        def get_activation_fn(self):
            return GroupMax(self.cfg.k)

    return GroupMaxSAE
