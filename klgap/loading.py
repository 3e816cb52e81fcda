"""Load a resolved run: its SAE, model and tokens, and the executor that measures its batches.

:func:`load_plan` turns a :class:`klgap.resolve.RunPlan` (checked, nothing loaded) into a :class:`Loaded` run,
which the modes (klgap/modes.py) measure batch by batch; :func:`prepare` does both for a config (notebooks,
benchmarks). At most one model is held (:func:`load_model`); perturbations that fit statistics are fitted on
the run's first clean activations before any batch (:func:`fit_perturbations`). The run around it (folder,
parts, report): klgap/engine.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap import activations
from klgap.capabilities import find_default_sae, fittable
from klgap.config import RunConfig
from klgap.errors import KlgapError
from klgap.executors import Executor, choose
from klgap.plugins import ModelRef, get_host, model_adapter
from klgap.protocols import LoadedModel, LoadedSAE, Placement, SiteSpec
from klgap.resolve import Intervention, RunPlan, SAERoute, resolve, route_sae, site_of
from klgap.saecheck import check_loaded_sae
from klgap.sites import hook_name

log = logging.getLogger("klgap")

__all__ = ["FIT_TOKENS", "Loaded", "default_sae", "fit_perturbations", "load_model", "load_plan", "load_sae", "prepare"]


@dataclass
class Loaded:
    """A plan with its model, SAE and tokens loaded and its executor chosen: what the modes measure."""

    plan: RunPlan
    model: LoadedModel
    sae: LoadedSAE
    site: str
    layer: int
    spec: SiteSpec
    contexts: Tensor  # [n_contexts ctx] int64, CPU
    center: bool
    executor: Executor
    execution: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    @property
    def interventions(self) -> tuple[Intervention, ...]:
        return self.plan.interventions

    @property
    def sample(self) -> Intervention | None:
        return self.plan.sample

    @property
    def n_batches(self) -> int:
        return -(-len(self.contexts) // self.config.batch_size)


_MODELS: dict[tuple[str, ...], LoadedModel] = {}


def load_model(model: str | ModelRef, device: torch.device, dtype: torch.dtype,
               placement: Placement = Placement()) -> LoadedModel:
    """Load (or reuse: at most one model is held) the model a ``--model`` value (or a resolved ModelRef) names."""
    ref = model if isinstance(model, ModelRef) else model_adapter(model)
    name = ref.name
    key = (name, id(ref.adapter), str(device), str(dtype), str(placement))
    if key not in _MODELS:
        from klgap.protocols import PlacingModelAdapter

        adapter = ref.adapter
        if not placement.local and not isinstance(adapter, PlacingModelAdapter):
            what = "--remote" if placement.remote else "--device-map"
            raise KlgapError(f"model {name!r} cannot take {what}: its adapter loads it locally only; {what} works "
                             "with Hugging Face hub models (gpt2, pythia-70m-deduped, a hub repo id, ...)")
        _MODELS.clear()
        _MODELS[key] = adapter.load(device, dtype) if placement.local else adapter.load_placed(device, dtype, placement)
    return _MODELS[key]


def load_sae(spec: str | SAERoute, device: torch.device) -> LoadedSAE:
    """Load an SAE spec (routed to its loader by :func:`klgap.resolve.route_sae`)."""
    route = route_sae(spec) if isinstance(spec, str) else spec
    sae = route.obj.load(route.arg, device)
    check_loaded_sae(sae)  # every loader's SAE, before anything else is loaded
    return sae


def default_sae(model: LoadedModel, site: str, layer: int) -> tuple[SAERoute, str]:
    """Ask every SAE loader that can name a pretrained SAE (:class:`klgap.protocols.DefaultSAEFinder`)."""
    found = find_default_sae(get_host().registry("sae_loader"), model, site, layer)
    if found is not None:
        spec, note = found
        return route_sae(spec), note
    raise KlgapError(
        f"no --sae given and no pretrained SAE is known for {model.name} {hook_name(site, layer)}; "
        f"train one with `klgap train-sae --model {model.name} --site {site} --layer {layer} --out DIR` "
        "and pass --sae DIR"
    )


def load_plan(plan: RunPlan) -> Loaded:
    """Load the SAE, the model and the tokens of a plan (in that order) and choose its executor."""
    config, device = plan.config, plan.device
    if isinstance(plan.sae, LoadedSAE):  # an SAE object from Python, already wrapped on the run's device
        sae, route = plan.sae, None
        check_loaded_sae(sae)
    else:
        route = plan.sae
        sae = load_sae(route, device) if route is not None else None
    site, layer = site_of(config, route, sae.hook_name if sae is not None else None)
    if site is None or layer is None:
        raise KlgapError(f"the SAE {sae.source!r} does not say where it was trained (no hook name); give --site and --layer")
    model = load_model(plan.model, device, plan.dtype, plan.placement)
    notes = [model.site_note] if model.site_note else []
    if layer >= model.n_layers:
        raise KlgapError(f"--layer {layer} is out of range for {model.name}: valid layers are 0..{model.n_layers - 1}")
    if config.context_len > model.max_context:
        raise KlgapError(f"--context-len {config.context_len} exceeds {model.name}'s maximum context of {model.max_context}")
    if sae is None:
        route, note = default_sae(model, site, layer)
        notes.append(note)
        log.warning(note)
        sae = load_sae(route, device)
        site_of(RunConfig(model=config.model, site=site, layer=layer), route, sae.hook_name)
    width = model.site_widths[site]
    if sae.d_in != width:
        raise KlgapError(f"the SAE {sae.source!r} has d_in={sae.d_in} but {model.name} {site} is {width} wide; "
                         "it was trained on another model or site")
    center = sae.center_resid and site.startswith("resid")
    if center:
        notes.append(
            "the SAE was trained with TransformerLens's center_writing_weights: resid activations are mean-centred "
            "over d_model before the SAE and every perturbation (LayerNorm makes the mean invisible downstream)"
        )
    contexts = plan.tokens.obj.contexts(model, config.n_contexts, config.context_len, config.seed,
                                        config.prepend_bos, plan.tokens.arg)
    if contexts.dim() == 2 and contexts.shape[1] == config.context_len and len(contexts) < config.n_contexts:
        raise KlgapError(f"token source {plan.tokens.name!r} gave {len(contexts)} contexts of {config.context_len} "
                         f"tokens but --tokens {config.tokens} needs {config.n_contexts}; nothing was measured: give "
                         f"--tokens {len(contexts) * config.context_len} or less, or a source with more text")
    if contexts.shape != (config.n_contexts, config.context_len):
        raise KlgapError(f"token source {plan.tokens.name!r} returned {tuple(contexts.shape)}, expected "
                         f"{(config.n_contexts, config.context_len)}")
    contexts = contexts.to(torch.long).cpu()
    spec = model.site_map(site, layer)
    executor, execution = choose(config, model, spec, layer, contexts)
    loaded = Loaded(plan, model, sae, site, layer, spec, contexts, center, executor, execution, notes)
    fitted = fit_perturbations(loaded)
    if fitted:
        loaded.execution = {**execution, "fitted": fitted}
    return loaded


def prepare(config: RunConfig) -> Loaded:
    """Resolve and load a config (no folder): what a notebook or a benchmark measures batches with."""
    return load_plan(resolve(config))


FIT_TOKENS = 8192  # clean activations handed to perturbations that fit statistics (epsilon_anisotropic)


@torch.no_grad()
def fit_perturbations(run: Loaded) -> dict[str, Any]:
    """Call ``fit(acts [n, d])`` on every perturbation that has one, with the clean site activations of the
    run's first contexts (up to FIT_TOKENS tokens; centred like the SAE's input). Same tokens on every resume."""
    perturbations = [i.perturbation for i in run.interventions] + ([run.sample.perturbation] if run.sample else [])
    needing = fittable(perturbations)
    if not needing:
        return {}
    config, model = run.config, run.model
    first = 1 if config.skip_first_position else 0
    per_context = config.context_len - first
    n_ctx = max(2, min(len(run.contexts), -(-FIT_TOKENS // per_context)))
    chunks = []
    for start in range(0, n_ctx, config.batch_size):
        ids = run.contexts[start:min(start + config.batch_size, n_ctx)].to(model.device)
        x = activations.collect(model, run.spec, ids)[:, first:].reshape(-1, run.sae.d_in).float()
        chunks.append(x - x.mean(-1, keepdim=True) if run.center else x)  # what SaeView.of hands the perturbations
    acts = torch.cat(chunks)
    acts = acts[torch.isfinite(acts).all(-1)]
    for p in needing:
        p.fit(acts)
    return {p.name: {"n_activations": int(acts.shape[0]), "n_contexts": n_ctx, "source": "the run's first contexts"}
            for p in needing}
