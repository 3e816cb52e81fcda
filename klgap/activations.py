"""Reading and patching a site through nnsight (the only module that touches nnsight objects)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from klgap.protocols import LoadedModel, SiteSpec


def wrap(model: LoadedModel) -> Any:
    """The nnsight wrapper of `model.hf_model`, created once and cached on the LoadedModel."""
    wrapped = model.info.get("_nnsight")
    if wrapped is None:
        from nnsight import NNsight

        wrapped = NNsight(model.hf_model)
        model.info["_nnsight"] = wrapped
    return wrapped


def envoy_at(root: Any, path: str) -> Any:
    """Walk a dotted module path (`transformer.h.3.mlp`) through nnsight envoys."""
    env = root
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _site_tensor(env: Any, spec: SiteSpec) -> Any:
    """The proxy of the site's `[batch pos d]` tensor inside a running trace."""
    value = env.input if spec.io == "input" else env.output
    return value if spec.index is None else value[spec.index]


def _model_inputs(ids: Tensor) -> dict[str, Any]:
    return {"input_ids": ids, "use_cache": False}


@torch.no_grad()
def run_clean(model: LoadedModel, spec: SiteSpec, ids: Tensor) -> tuple[Tensor, Tensor]:
    """One clean forward: returns (site activation ``[batch pos d]``, logits ``[batch pos vocab]``)."""
    nn = wrap(model)
    with nn.trace(**_model_inputs(ids)):
        acts = _site_tensor(envoy_at(nn, spec.module), spec).clone().save()
        logits = nn.output.logits.save()
    return acts, logits


@torch.no_grad()
def collect(model: LoadedModel, spec: SiteSpec, ids: Tensor) -> Tensor:
    """Site activation ``[batch pos d]`` for `ids`, stopping the forward pass right after the site."""
    nn = wrap(model)
    with nn.trace(**_model_inputs(ids)) as tracer:
        acts = _site_tensor(envoy_at(nn, spec.module), spec).clone().save()
        tracer.stop()
    return acts


@torch.no_grad()
def collect_many(model: LoadedModel, specs: list[SiteSpec], ids: Tensor) -> list[Tensor]:
    """Activations ``[batch pos d]`` at several sites from one forward pass (in the order of `specs`)."""
    nn = wrap(model)
    saved: list[Any] = []
    with nn.trace(**_model_inputs(ids)) as tracer:
        for spec in specs:
            saved.append(_site_tensor(envoy_at(nn, spec.module), spec).clone().save())
        tracer.stop()
    return [torch.as_tensor(value) for value in saved]


@torch.no_grad()
def run_patched(
    model: LoadedModel,
    spec: SiteSpec,
    ids: Tensor,
    x_prime: Tensor,
    positions: slice | Tensor | None = None,
) -> Tensor:
    """Forward with the site replaced by `x_prime` at `positions` (all when None); returns logits.

    x_prime: ``[batch pos d]`` (or ``[batch len(positions) d]`` when positions is given), in the
    model's dtype and on its device.
    """
    nn = wrap(model)
    with nn.trace(**_model_inputs(ids)):
        site = _site_tensor(envoy_at(nn, spec.module), spec)
        if positions is None:
            site[:] = x_prime
        else:
            site[:, positions] = x_prime
        logits = nn.output.logits.save()
    return logits
