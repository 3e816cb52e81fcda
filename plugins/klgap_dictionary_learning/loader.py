"""Read a dictionary_learning trainer folder and rebuild its autoencoder as a sae_lens SAE with identical math.

What dictionary_learning (saprmarks/dictionary_learning: ``training.py``, ``dictionary.py``, ``trainers/*.py``)
writes into ``save_dir/trainer_i/``: ``config.json`` = ``{"trainer": trainer.config, "buffer": ...}`` (the
trainer config names ``dict_class``, ``activation_dim``, ``dict_size``, ``k``, ``layer``, ``lm_name``,
``submodule_name``, ...) and ``ae.pt`` = ``torch.save`` of the final ``state_dict`` (biases already rescaled when
``normalize_activations`` was on, so the dictionary applies to raw activations). The forward passes, D =
activation_dim, F = dict_size:

- ``AutoEncoder``: ``relu(encoder(x - bias))``, ``decoder(f) + bias`` (``encoder.weight [F, D]``,
  ``encoder.bias``, ``decoder.weight [D, F]``, ``bias``) -> StandardSAE, b_dec applied to the input.
- ``AutoEncoderNew``: ``relu(encoder(x))``, ``decoder(f)`` (decoder with a bias) -> StandardSAE, b_dec not applied.
- ``AutoEncoderTopK``: ``topk_k(relu(encoder(x - b_dec)))``, ``decoder(f) + b_dec`` (+ buffers ``k``,
  ``threshold``; ``encode`` defaults to ``use_threshold=False``) -> TopKSAE, b_dec applied.
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: at inference (``use_threshold=True``, the default)
  ``r * (r > threshold)`` with ``r = relu(pre)``, a scalar threshold -> JumpReLUSAE with that threshold on every
  latent (sae_lens's ``relu(pre) * (pre > t)`` is the same function for t >= 0 and for t < 0), b_dec applied.
  Matryoshka stores ``W_enc [D, F]``, ``W_dec [F, D]``; a freshly loaded one has every group active.
- ``JumpReluAutoEncoder``: ``relu(pre * (pre > threshold))``, ``pre = x @ W_enc + b_enc`` (its
  ``apply_b_dec_to_input`` is False when loaded from a file) -> JumpReLUSAE (``relu(pre) * (pre > threshold)``,
  the same function), b_dec not applied.
- ``GatedAutoEncoder``: ``x_enc = encoder(x - decoder_bias)``, ``(x_enc + gate_bias > 0) * relu(exp(r_mag) *
  x_enc + mag_bias)`` -> GatedSAE (``b_gate``, ``b_mag``, ``r_mag``), b_dec applied.

Upstream's ``AutoEncoder.from_pretrained`` also renormalises decoder columns, scaling the encoder to match;
that leaves the function unchanged, so it is not repeated here.

This module is the format's converter (files -> ``(cfg_dict, state_dict)``); reading, errors and building the
sae_lens SAE are :mod:`klgap_saes.convert`'s, shared with the other formats.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedSAE, SAECheck
from klgap.plan.sites import hook_name
from klgap_saes.convert import Converted, FolderFormat, check_shapes, load_converted, read_torch, require_keys

WEIGHTS, CONFIG = "ae.pt", "config.json"
FORMAT = FolderFormat("dictionary_learning", (WEIGHTS, CONFIG), "trainer folder", "save_dir/trainer_0")
CONFIG_EXPECTED = '{"trainer": {...}}'

State = dict[str, torch.Tensor]


def _t(name: str) -> Callable[[State], torch.Tensor]:
    return lambda sd: sd[name].T


def _same(name: str) -> Callable[[State], torch.Tensor]:
    return lambda sd: sd[name]


def _scalar_threshold(sd: State) -> torch.Tensor:
    """BatchTopK's one scalar threshold, on every latent (sae_lens's JumpReLU holds one per latent)."""
    d_sae = sd["encoder.weight"].shape[0] if "encoder.weight" in sd else sd["W_enc"].shape[1]
    return sd["threshold"].reshape(()).expand(d_sae).clone()


@dataclass(frozen=True)
class DictClass:
    """One dictionary_learning class: its state_dict (shapes over D, F; () a scalar) and its sae_lens twin."""

    keys: dict[str, tuple[str, ...]]
    weights_key: str  # the key D and F are read from
    sae: str  # standard | topk | jumprelu | gated
    apply_b_dec_to_input: bool
    to_sae_lens: dict[str, Callable[[State], torch.Tensor]]
    optional: tuple[str, ...] = ()
    activation: str = ""


_LINEAR = {"encoder.weight": ("F", "D"), "encoder.bias": ("F",), "decoder.weight": ("D", "F")}
_LINEAR_TO = {"W_enc": _t("encoder.weight"), "b_enc": _same("encoder.bias"), "W_dec": _t("decoder.weight")}
_PARAMS = {"W_enc": ("D", "F"), "b_enc": ("F",), "W_dec": ("F", "D"), "b_dec": ("D",)}
_PARAMS_TO = {name: _same(name) for name in _PARAMS}
_BATCH_TOPK = DictClass(
    {**_LINEAR, "b_dec": ("D",), "k": (), "threshold": ()}, "encoder.weight", "jumprelu", True,
    {**_LINEAR_TO, "b_dec": _same("b_dec"), "threshold": _scalar_threshold}, activation="batchtopk",
)

#: dict_class (as config.json names it) -> how to read it.
DICT_CLASSES: dict[str, DictClass] = {
    "AutoEncoder": DictClass(
        {**_LINEAR, "bias": ("D",)}, "encoder.weight", "standard", True, {**_LINEAR_TO, "b_dec": _same("bias")},
        activation="relu",
    ),
    "AutoEncoderNew": DictClass(
        {**_LINEAR, "decoder.bias": ("D",)}, "encoder.weight", "standard", False,
        {**_LINEAR_TO, "b_dec": _same("decoder.bias")}, activation="relu",
    ),
    "AutoEncoderTopK": DictClass(
        {**_LINEAR, "b_dec": ("D",), "k": (), "threshold": ()}, "encoder.weight", "topk", True,
        {**_LINEAR_TO, "b_dec": _same("b_dec")}, optional=("k", "threshold"), activation="topk",
    ),
    "BatchTopKSAE": _BATCH_TOPK,
    "MatryoshkaBatchTopKSAE": DictClass(
        {**_PARAMS, "k": (), "threshold": (), "group_sizes": ("G",)}, "W_enc", "jumprelu", True,
        {**_PARAMS_TO, "threshold": _scalar_threshold}, activation="batchtopk",
    ),
    "JumpReluAutoEncoder": DictClass(
        {**_PARAMS, "threshold": ("F",)}, "W_enc", "jumprelu", False, {**_PARAMS_TO, "threshold": _same("threshold")},
        activation="jumprelu",
    ),
    "GatedAutoEncoder": DictClass(
        {"encoder.weight": ("F", "D"), "decoder.weight": ("D", "F"), "decoder_bias": ("D",), "r_mag": ("F",),
         "gate_bias": ("F",), "mag_bias": ("F",)},
        "encoder.weight", "gated", True,
        {"W_enc": _t("encoder.weight"), "W_dec": _t("decoder.weight"), "b_dec": _same("decoder_bias"),
         "r_mag": _same("r_mag"), "b_gate": _same("gate_bias"), "b_mag": _same("mag_bias")},
        activation="gated",
    ),
}

# submodule_name as dictionary_learning's scripts write it (`resid_post_layer_3`) and its released folder
# names (`mlp_out_layer1`, `attn_out_layer0`, `resid_out_layer2`: resid_i is the output of layer i).
_SUBMODULE = re.compile(
    r"^(?P<site>resid_post|resid_out|resid_pre|resid|mlp_out|mlp|attn_out|attn)(?:_?layer_?(?P<layer>\d+))?$"
)
_SITES = {"resid_post": "resid_post", "resid_out": "resid_post", "resid": "resid_post", "resid_pre": "resid_pre",
          "mlp_out": "mlp_out", "mlp": "mlp_out", "attn_out": "attn_out", "attn": "attn_out"}


def hook_name_for_submodule(submodule: str | None, layer: Any = None) -> str | None:
    """`resid_post_layer_3` -> blocks.3.hook_resid_post; `mlp_out` + layer 2 -> blocks.2.hook_mlp_out; else None."""
    if not isinstance(submodule, str):
        return None
    match = _SUBMODULE.match(submodule.strip())
    if match is None:
        return None
    if match["layer"] is not None:
        layer = int(match["layer"])
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        return None
    return hook_name(_SITES[match["site"]], layer)


def infer_dict_class(state: State) -> str | None:
    """The dict_class whose state_dict keys these are (for a config.json that does not name one)."""
    keys = set(state)
    matches = [name for name, dc in DICT_CLASSES.items() if set(dc.keys) - set(dc.optional) <= keys <= set(dc.keys)]
    return matches[0] if len(matches) == 1 else None  # AutoEncoderTopK and BatchTopKSAE share their keys


def trainer_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``trainer`` part (the trainer's config: dict_class, activation_dim, k, submodule_name, ...)."""
    return config["trainer"] if isinstance(config.get("trainer"), dict) else {}


def hook_of(config: dict[str, Any], path: Path) -> str | None:
    """The hook name: ``hook_name`` in config.json (top level or trainer), else from ``submodule_name`` (+
    ``layer``), else from the folder's or its parent's name (``resid_post_layer_3/trainer_0``)."""
    trainer = trainer_config(config)
    return (
        config.get("hook_name") or trainer.get("hook_name")
        or hook_name_for_submodule(trainer.get("submodule_name"), trainer.get("layer"))
        or hook_name_for_submodule(path.name) or hook_name_for_submodule(path.parent.name)
    )


class DictionaryLearningLoader:
    """A dictionary_learning trainer folder (ae.pt + config.json)."""

    description = (
        "a dictionary_learning folder: ae.pt + config.json (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, "
        "MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder, AutoEncoderNew; hook from submodule_name)"
    )

    def can_load(self, spec: str) -> bool:
        return FORMAT.matches(spec)

    def check(self, spec: str) -> SAECheck:
        """The hook name and model from config.json (or the folder's name); ae.pt is not read."""
        path = FORMAT.folder(spec)
        config = FORMAT.read_json(path / CONFIG, spec, CONFIG_EXPECTED)
        trainer = trainer_config(config)
        model = trainer.get("lm_name") if isinstance(trainer.get("lm_name"), str) else None
        dict_class = trainer.get("dict_class")
        return SAECheck(hook_name=hook_of(config, path), model=model,
                        detail=f"dictionary_learning {dict_class}" if isinstance(dict_class, str) else "dictionary_learning")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        path = FORMAT.folder(spec)
        config = FORMAT.read_json(path / CONFIG, spec, CONFIG_EXPECTED)
        state = _read_state(path / WEIGHTS, spec)
        return load_converted(convert(config, state, path, spec), str(path), device)


def _read_state(file: Path, spec: str) -> State:
    state = read_torch(file, f"{FORMAT.where(spec)}: {WEIGHTS}")
    if isinstance(state, dict) and isinstance(state.get("ae"), dict):
        state = state["ae"]  # a mid-training backup: {"step", "ae", "optimizer", "config", "norm_factor"}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KlgapError(f"dictionary_learning folder {spec!r}: {WEIGHTS} does not hold a state_dict of tensors")
    return state


def convert(config: dict[str, Any], state: State, path: Path, spec: str) -> Converted:
    """The trainer folder `path`'s config.json + ae.pt as the config + state_dict of the sae_lens SAE that
    computes what dictionary_learning's ``dict_class`` computes, with notes for the report."""
    trainer = trainer_config(config)
    dict_class = trainer.get("dict_class") or infer_dict_class(state)
    if not dict_class:
        raise KlgapError(
            f"dictionary_learning folder {spec!r}: {CONFIG} names no trainer.dict_class and the keys of {WEIGHTS} "
            f"do not pick one; set it to one of: {', '.join(DICT_CLASSES)}"
        )
    if dict_class not in DICT_CLASSES:
        raise KlgapError(
            f"dictionary_learning folder {spec!r}: unsupported dict_class {dict_class!r}; "
            f"supported: {', '.join(DICT_CLASSES)}"
        )
    dc = DICT_CLASSES[dict_class]
    where = f"dictionary_learning folder {spec!r} ({dict_class})"
    require_keys(state, [k for k in dc.keys if k not in dc.optional], f"{where}: {WEIGHTS}",
                 f"a {dict_class} state_dict has {', '.join(dc.keys)}")
    unexpected = [k for k in state if k not in dc.keys]
    if unexpected:
        raise KlgapError(
            f"{where}: {WEIGHTS} has unexpected keys {', '.join(unexpected)}; a {dict_class} state_dict has "
            f"{', '.join(dc.keys)} (is dict_class in {CONFIG} right?)"
        )
    weights = state[dc.weights_key]
    if weights.dim() != 2:
        raise KlgapError(f"{where}: {dc.weights_key} has shape {tuple(weights.shape)}, expected a matrix")
    F, D = weights.shape if dc.keys[dc.weights_key] == ("F", "D") else weights.shape[::-1]
    dims = {"D": D, "F": F}
    for key, expected in (("activation_dim", D), ("dict_size", F)):
        if key in trainer and trainer[key] != expected:
            raise KlgapError(f"{where}: {CONFIG} says {key}={trainer[key]!r} but {dc.weights_key} implies {expected}")
    shapes = {key: tuple(dims[d] for d in template) for key, template in dc.keys.items()
              if key in state and "G" not in template}
    check_shapes(state, shapes, where, f"activation_dim={D}, dict_size={F}")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    info: dict[str, Any] = {"format": "dictionary_learning", "dict_class": dict_class, "activation": dc.activation}
    for key in ("trainer_class", "lm_name", "layer", "submodule_name", "norm_factor"):
        if isinstance(trainer.get(key), (str, int, float)):
            info[key] = trainer[key]
    cfg_dict: dict[str, Any] = {
        "architecture": dc.sae, "d_in": int(D), "d_sae": int(F), "apply_b_dec_to_input": dc.apply_b_dec_to_input,
        "metadata": {"hook_name": hook_of(config, path)},
    }
    if isinstance(trainer.get("lm_name"), str):
        cfg_dict["metadata"]["model_name"] = trainer["lm_name"]
    if dc.sae == "topk":
        cfg_dict["k"] = info["k"] = _k(state, trainer, F, where)
    if "group_sizes" in state and int(state["group_sizes"].sum()) != F:
        raise KlgapError(f"{where}: group_sizes sum to {int(state['group_sizes'].sum())}, expected dict_size={F}")
    if dc.activation == "batchtopk":
        info["k_train"] = _k(state, trainer, F, where)
        info["threshold"] = float(state["threshold"].reshape(()))
        if info["threshold"] < 0:
            info["note"] = "threshold was never set (< 0): upstream's encode then keeps every positive latent (ReLU)"
    return Converted(cfg_dict, {name: fn(state) for name, fn in dc.to_sae_lens.items()}, info)


def _k(state: State, trainer: dict[str, Any], F: int, where: str) -> int:
    """k from the state_dict's buffer, checked against config.json (upstream raises when they differ)."""
    stored = int(state["k"].reshape(())) if "k" in state else None
    configured = trainer.get("k")
    if stored is not None and isinstance(configured, int) and configured != stored:
        raise KlgapError(f"{where}: {CONFIG} says k={configured} but {WEIGHTS} holds k={stored}")
    k = stored if stored is not None else configured
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= F:
        raise KlgapError(f"{where}: k={k!r} must be an integer between 1 and dict_size={F}")
    return k
