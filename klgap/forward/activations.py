"""Reading and patching a site through nnsight (the only module that touches nnsight objects)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel, SiteSpec


def wrap(model: LoadedModel) -> Any:
    """The nnsight wrapper of `model.hf_model`, created once and cached on the LoadedModel."""
    if model.nnsight is None:
        from nnsight import NNsight

        model.nnsight = NNsight(model.hf_model)
    return model.nnsight


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


def _trace(model: LoadedModel, nn: Any, ids: Tensor) -> Any:
    """``nn.trace(...)``, on NDIF when the model was loaded with ``remote=True``."""
    if model.remote:
        return nn.trace(**_model_inputs(ids), remote=True)
    return nn.trace(**_model_inputs(ids))


def _remote_error(exc: BaseException) -> KlgapError:
    from nnsight import CONFIG

    return KlgapError(
        f"remote execution on NDIF ({CONFIG.API.HOST}) failed: {type(exc).__name__}: {exc}; it needs the network "
        "and an NDIF API key (nnsight.CONFIG.set_default_api_key or NDIF_API_KEY)"
    )


@torch.no_grad()
def run_clean(model: LoadedModel, spec: SiteSpec, ids: Tensor) -> tuple[Tensor, Tensor]:
    """One clean forward: returns (site activation ``[batch pos d]``, logits ``[batch pos vocab]``)."""
    nn = wrap(model)
    try:
        with _trace(model, nn, ids):
            acts = _site_tensor(envoy_at(nn, spec.module), spec).clone().save()
            logits = nn.output.logits.save()
    except (OSError, ConnectionError) as exc:
        if model.remote:
            raise _remote_error(exc) from exc
        raise
    return torch.as_tensor(acts), torch.as_tensor(logits)


@torch.no_grad()
def collect(model: LoadedModel, spec: SiteSpec, ids: Tensor) -> Tensor:
    """Site activation ``[batch pos d]`` for `ids`, stopping the forward pass right after the site."""
    nn = wrap(model)
    with _trace(model, nn, ids) as tracer:
        acts = _site_tensor(envoy_at(nn, spec.module), spec).clone().save()
        tracer.stop()
    return acts


@torch.no_grad()
def collect_many(model: LoadedModel, specs: list[SiteSpec], ids: Tensor) -> list[Tensor]:
    """Activations ``[batch pos d]`` at several sites from one forward pass (in the order of `specs`)."""
    nn = wrap(model)
    saved: list[Any] = []
    with _trace(model, nn, ids) as tracer:
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
    try:
        with _trace(model, nn, ids):
            env = envoy_at(nn, spec.module)
            site = _site_tensor(env, spec)
            x_site = x_prime.to(site.device)  # a model spread over devices (device_map) holds sites anywhere
            if spec.io == "input":  # a new input, not the old one changed in place: a module's input may also be
                site = site.clone()  # the residual the block adds to afterwards (OLMo 2's MLP reads resid_mid)
            if positions is None:
                site[:] = x_site
            else:
                site[:, positions] = x_site
            if spec.io == "input":
                env.input = site
            logits = nn.output.logits.save()
    except (OSError, ConnectionError) as exc:
        if model.remote:
            raise _remote_error(exc) from exc
        raise
    return torch.as_tensor(logits)
