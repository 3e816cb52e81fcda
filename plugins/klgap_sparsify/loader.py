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
A transcoder (``transcode = true``, hookpoint ``layers.N.mlp``) reads the MLP's input and predicts its output:
``encode`` skips the b_dec subtraction and a skip connection adds ``x @ W_skipᵀ``. It becomes klgap's
``topk_transcoder`` / ``topk_skip_transcoder`` (sae_lens's Transcoder / SkipTranscoder with sparsify's top-k,
:func:`topk_transcoder_classes`), which reads mlp_in and writes mlp_out (klgap/sae/transcoder.py). A skip
connection on an SAE (transcode = false), and a groupmax transcoder, are refused.

This module is the format's converter (files -> ``(cfg_dict, state_dict)``); reading, errors and building the
sae_lens SAE are :mod:`klgap_saes.convert`'s, shared with the other formats.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from klgap.errors import KlgapError
from klgap.protocols import LoadedSAE, SAECheck
from klgap.plan.sites import hook_name
from klgap_saes.convert import (
    Converted, FolderFormat, check_shapes, load_converted, read_safetensors, register_architecture, require_keys,
)

if TYPE_CHECKING:
    from torch import Tensor

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")
FORMAT = FolderFormat("sparsify", (CFG, WEIGHTS), "hookpoint folder", "CHECKPOINT/layers.6")
CFG_EXPECTED = "an object of SparseCoderConfig fields + d_in"

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


def hook_of(cfg: dict[str, Any], path: Path) -> str | None:
    """The hook name: ``hook_name`` in cfg.json when set, else from the hookpoint folder's name."""
    return cfg.get("hook_name") or hook_name_for_hookpoint(hookpoint_of(path))


class SparsifyLoader:
    """One hookpoint folder of an EleutherAI sparsify checkpoint (SAE, TopK or GroupMax activation)."""

    description = (
        "an EleutherAI sparsify hookpoint folder: cfg.json + sae.safetensors (TopK/GroupMax; hook from the "
        "folder name: layers.N -> resid_post, layers.N.mlp -> mlp_out, layers.N.self_attn -> attn_out)"
    )

    def can_load(self, spec: str) -> bool:
        return FORMAT.matches(spec)

    def check(self, spec: str) -> SAECheck:
        """The hook name from cfg.json or the folder's name; the weights are not read."""
        path = FORMAT.folder(spec)
        cfg = FORMAT.read_json(path / CFG, spec, CFG_EXPECTED)
        return SAECheck(hook_name=hook_of(cfg, path), detail=f"sparsify {cfg.get('activation', 'topk')}, k={cfg.get('k')}")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        path = FORMAT.folder(spec)
        cfg = FORMAT.read_json(path / CFG, spec, CFG_EXPECTED)
        tensors, _ = read_safetensors(path / WEIGHTS, f"{FORMAT.where(spec)}: {WEIGHTS}")
        return load_converted(convert(cfg, tensors, path, spec), str(path), device)


def _cfg_int(cfg: dict[str, Any], key: str, spec: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KlgapError(f"sparsify folder {spec!r}: {CFG} has {key}={value!r}; it must be a non-negative integer")
    return value


def convert(cfg: dict[str, Any], tensors: dict[str, Tensor], path: Path, spec: str) -> Converted:
    """The hookpoint folder `path`'s cfg.json + sae.safetensors as a sae_lens TopKSAE config + state_dict
    (architecture ``topk``, or ``groupmax``: :func:`groupmax_classes`)."""
    transcode = bool(cfg.get("transcode"))
    skip = bool(cfg.get("skip_connection")) or "W_skip" in tensors
    if skip and not transcode:
        raise KlgapError(
            f"sparsify folder {spec!r} has a skip connection (W_skip) but is not a transcoder; klgap measures SAEs "
            "with skip_connection=false, and transcoders (transcode=true) with or without one"
        )
    activation = cfg.get("activation", "topk")
    if transcode and activation != "topk":
        raise KlgapError(f"sparsify folder {spec!r}: a {activation} transcoder is not supported; supported: topk")
    hook = hook_of(cfg, path)
    if transcode and (hook is None or not hook.endswith("hook_mlp_out")):
        raise KlgapError(f"sparsify folder {spec!r} is a transcoder at hookpoint {hookpoint_of(path)!r}; klgap measures "
                         "transcoders of an MLP (hookpoint layers.N.mlp: its input -> its output)")
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
    if skip:
        expected["W_skip"] = (d_in, d_in)
    require_keys(tensors, list(expected), f"{FORMAT.where(spec)}: {WEIGHTS}", f"it needs {', '.join(expected)}")
    check_shapes(tensors, expected, FORMAT.where(spec), f"d_in={d_in}, num_latents={num_latents} from {CFG}")
    cfg_dict: dict[str, Any] = {
        "architecture": activation, "d_in": d_in, "d_sae": num_latents, "k": k, "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": False, "metadata": {"hook_name": hook},
    }
    state_dict = {
        "W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"],
    }
    if transcode:  # reads the MLP's input (no b_dec subtracted), writes its output: klgap.sae.transcoder
        layer = hook.split(".")[1]  # type: ignore[union-attr]
        cfg_dict = {"architecture": "topk_skip_transcoder" if skip else "topk_transcoder", "d_in": d_in,
                    "d_sae": num_latents, "d_out": d_in, "k": k, "apply_b_dec_to_input": False,
                    "metadata": {"hook_name": f"blocks.{layer}.ln2.hook_normalized", "hook_name_out": hook}}
        if skip:
            state_dict["W_skip"] = tensors["W_skip"]
    info = {
        "format": "sparsify", "hookpoint": hookpoint_of(path), "activation": activation, "k": k, "transcode": transcode, "multi_topk": bool(cfg.get("multi_topk", False)),
        "normalize_decoder": bool(cfg.get("normalize_decoder", True)), "stored_dtype": str(tensors["W_dec"].dtype),
    }
    return Converted(cfg_dict, state_dict, info)


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
def groupmax_classes() -> tuple[type, type]:
    """(GroupMaxSAE, GroupMaxSAEConfig): sae_lens's TopKSAE with sparsify's GroupMax as its activation,
    architecture ``groupmax`` (built on first use: importing sae_lens is slow)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    class GroupMaxSAEConfig(TopKSAEConfig):
        """TopKSAEConfig under the architecture name ``groupmax``."""

        @classmethod
        def architecture(cls) -> str:
            return "groupmax"

    class GroupMaxSAE(TopKSAE):
        """sparsify's groupmax SAE: TopKSAE's encoder, decoder and b_dec handling, GroupMax activation."""

        def get_activation_fn(self):
            return GroupMax(self.cfg.k)

    return GroupMaxSAE, GroupMaxSAEConfig


@lru_cache(maxsize=2)
def topk_transcoder_classes(skip: bool = False) -> tuple[type, type]:
    """(TopKTranscoder, its config) — with `skip`, (TopKSkipTranscoder, its config): sae_lens's Transcoder /
    SkipTranscoder with sparsify's top-k activation (sae_lens's TopK: the k largest pre-activations, ReLU'd),
    architecture ``topk_transcoder`` / ``topk_skip_transcoder``."""
    from dataclasses import dataclass

    from sae_lens.saes.topk_sae import TopK
    from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

    base, base_cfg = (SkipTranscoder, SkipTranscoderConfig) if skip else (Transcoder, TranscoderConfig)
    name = "topk_skip_transcoder" if skip else "topk_transcoder"

    @dataclass
    class TopKTranscoderConfig(base_cfg):  # type: ignore[valid-type,misc]
        """A transcoder config with sparsify's k."""

        k: int = 32

        @classmethod
        def architecture(cls) -> str:
            return name

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> Any:
            from sae_lens.saes.sae import SAEMetadata
            from sae_lens.util import filter_valid_dataclass_fields

            res = cls(**filter_valid_dataclass_fields(config_dict, cls))
            if "metadata" in config_dict:
                res.metadata = SAEMetadata(**config_dict["metadata"])
            return res

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), "k": self.k}

    class TopKTranscoder(base):  # type: ignore[valid-type,misc]
        """sparsify's top-k transcoder (with its skip connection when `skip`)."""

        def get_activation_fn(self):
            return TopK(self.cfg.k, use_sparse_activations=False)

        @classmethod
        def from_dict(cls, config_dict: dict[str, Any]) -> Any:
            return cls(TopKTranscoderConfig.from_dict(config_dict))

    return TopKTranscoder, TopKTranscoderConfig


register_architecture("groupmax", groupmax_classes)
register_architecture("topk_transcoder", lambda: topk_transcoder_classes(False))
register_architecture("topk_skip_transcoder", lambda: topk_transcoder_classes(True))
