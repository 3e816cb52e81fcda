"""Load a resolved run: its SAE, model and tokens, and the executor that measures its batches.

:func:`load_plan` turns a :class:`klgap.plan.resolve.RunPlan` (checked, nothing loaded) into a :class:`Loaded` run,
which the modes (klgap/job/modes.py) measure batch by batch. At most one model is held (:func:`load_model`; a
bfloat16 / float16 model is a copy of the float32 load, :func:`cast_copy`, kept beside it as the run's
:attr:`Loaded.reference`); perturbations that fit statistics are fitted on the fit tokens' clean activations
(--fit-tokens, else the run's first contexts; float32 ones in a low-precision run) before any batch
(:func:`fit_perturbations`). A job's runs and cells, and a low-precision job's check against float32:
klgap/job/cells.py (load_job, prepare), klgap/job/precision.py; the batch loop: klgap/job/batches.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.forward import activations
from klgap.forward.executors import Executor, choose
from klgap.forward.fisher import check_replayable
from klgap.job.disjoint import held_out, say
from klgap.job.masks import kept, special_token_ids
from klgap.job.view import SaeView
from klgap.plan.config import RunConfig
from klgap.plan.dtypes import is_low
from klgap.plan.resolve import Intervention, RunPlan, SAERoute, default_sae, pick_device, route_sae, site_of
from klgap.plan.sites import hook_name
from klgap.plugins.capabilities import (context_fittable, error_fittable, error_splitter, fit_summary, fittable,
                                        model_shape, sae_fittable, without_skip)
from klgap.plugins.manager import ModelRef, model_adapter
from klgap.protocols import (ContextFittablePerturbation, ErrorSplitter, LoadedModel, LoadedSAE, ModelShape, Placement,
                             SiteSpec)
from klgap.report.schema import HeldOut, PrecisionCheck
from klgap.sae.check import check_loaded_sae

log = logging.getLogger("klgap")

__all__ = ["FIT_TOKENS", "Loaded", "cast_copy", "check_fits", "check_skip", "check_token_ids", "count_layers", "draw_contexts",
           "fit_perturbations", "load_model", "load_plan", "load_sae", "n_fit_contexts", "reference_model"]


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
    fit_contexts: Tensor | None = None  # [n_fit ctx] int64, CPU: drawn after `contexts` (--fit-tokens), else None
    route: SAERoute | None = None  # the loader that read the SAE (the plan's, or the default SAE's); None: an object
    precision: PrecisionCheck | None = None  # a low-precision run's check against float32 (klgap/job/precision.py)
    reference: LoadedModel | None = None  # the float32 model a low-precision run is checked against; else None
    held_out: HeldOut | None = None  # the measured tokens against the SAE's training tokens (klgap/job/disjoint.py)
    read_spec: SiteSpec | None = None  # where a substitute that reads another site reads (a transcoder's mlp_in)

    def reads(self, ids: Tensor) -> Tensor:
        """What the substitute reads for ``ids [b n]``: the read site's clean activation ``[b n d_in]`` (a forward
        stopped right after it)."""
        assert self.read_spec is not None
        return activations.collect(self.model, self.read_spec, ids)

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
    def error_split(self) -> ErrorSplitter | None:
        """The run's split of the SAE's error into e_lin + e_nl (its first intervention declaring one), or None."""
        return error_splitter(i.perturbation for i in self.interventions)

    @property
    def n_batches(self) -> int:
        return -(-len(self.contexts) // self.config.batch_size)


_MODELS: dict[tuple[str, ...], dict[torch.dtype | str, LoadedModel]] = {}
HELD = "python"  # the plugin name of a model the caller holds (klgap.api): it is not loaded again
HELD_REFERENCE = "float32 reference"  # where a held low-precision model's float32 copy is kept (not a load of it)


def _key(ref: ModelRef, device: torch.device, placement: Placement) -> tuple[str, ...]:
    return ref.name, str(id(ref.adapter)), str(device), str(placement)


def load_model(model: str | ModelRef, device: torch.device, dtype: torch.dtype,
               placement: Placement = Placement()) -> LoadedModel:
    """Load (or reuse: at most one model is held, in the dtypes asked for) the model a ``--model`` value (or a
    resolved ModelRef) names. bfloat16 / float16 on one device: a copy of the float32 load, which stays held
    for the precision check (klgap/job/precision.py)."""
    ref = model if isinstance(model, ModelRef) else model_adapter(model)
    name = ref.name
    key = _key(ref, device, placement)
    if key not in _MODELS:
        from klgap.protocols import PlacingModelAdapter

        if not placement.local and not isinstance(ref.adapter, PlacingModelAdapter):
            what = "--remote" if placement.remote else "--device-map"
            raise KlgapError(f"model {name!r} cannot take {what}: its adapter loads it locally only; {what} works "
                             "with Hugging Face hub models (gpt2, pythia-70m-deduped, a hub repo id, ...)")
        _MODELS.clear()
        _MODELS[key] = {}
    held = _MODELS[key]
    if dtype not in held:
        if is_low(dtype) and placement.local and ref.plugin != HELD:
            held[dtype] = cast_copy(load_model(ref, device, torch.float32, placement), dtype)
        else:
            held[dtype] = (ref.adapter.load(device, dtype) if placement.local
                           else ref.adapter.load_placed(device, dtype, placement))
    return held[dtype]


def reference_model(plan: RunPlan, model: LoadedModel) -> LoadedModel | None:
    """The float32 model a low-precision run is checked against (klgap/job/precision.py): the float32 load it
    was copied from, or for a model the caller holds, its own weights cast to float32. None when the run is not
    low precision, or its model is remote or spread over devices (not checked)."""
    if not is_low(model.dtype) or model.remote or not plan.placement.local:
        return None
    if plan.model.plugin != HELD:
        return load_model(plan.model, plan.device, torch.float32, plan.placement)
    held = _MODELS[_key(plan.model, plan.device, plan.placement)]  # one copy for every site of a job
    if HELD_REFERENCE not in held:
        held[HELD_REFERENCE] = cast_copy(model, torch.float32)
    return held[HELD_REFERENCE]


def cast_copy(model: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A copy of `model` with its floating-point parameters cast to `dtype` (the original's are not copied
    first); buffers (rotary frequencies, masks) are shared with `model`, unconverted, as
    ``from_pretrained(dtype=bfloat16)`` keeps e.g. rotary ``inv_freq`` (rounding it would move every attention
    score)."""
    params = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
              for p in model.hf_model.parameters() if p.is_floating_point()}
    memo: dict[int, Any] = dict(params)
    memo.update({id(b): b for b in model.hf_model.buffers()})
    hf_model = copy.deepcopy(model.hf_model, memo)
    return dataclasses.replace(model, hf_model=hf_model, dtype=dtype, nnsight=None)


def load_sae(spec: str | SAERoute, device: torch.device) -> LoadedSAE:
    """Load an SAE spec (routed to its loader by :func:`klgap.plan.resolve.route_sae`)."""
    route = route_sae(spec) if isinstance(spec, str) else spec
    sae = route.obj.load(route.arg, device)
    check_loaded_sae(sae)  # every loader's SAE, before anything else is loaded
    return sae


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
    shape = model_shape(plan.model.adapter)
    if shape is not None:  # from the model's config: a bad layer, context or SAE width fails before the weights load
        check_fits(shape, plan.model.name, site, layer, config.context_len, sae)
    model = load_model(plan.model, device, plan.dtype, plan.placement)
    notes = [note for note in (model.site_note, model.tokenizer_note) if note]
    check_fits(model, model.name, site, layer, config.context_len, None)
    if sae is None:
        route, note = default_sae(model, site, layer)
        notes.append(note)
        log.warning(note)
        sae = load_sae(route, device)
        site_of(RunConfig(model=config.model, site=site, layer=layer), route, sae.hook_name)
    check_fits(model, model.name, site, layer, config.context_len, sae)
    center = sae.center_resid and site.startswith("resid")
    if center:
        notes.append(
            "the SAE was trained with TransformerLens's center_writing_weights: resid activations are mean-centred "
            "over d_model before the SAE and every perturbation (LayerNorm makes the mean invisible downstream)"
        )
    found = held_out(plan.tokens, sae, config.dataset)  # measured tokens vs the SAE's training tokens
    if found.why is not None:
        notes.append(found.why)
    say(found)
    contexts, fit_contexts = draw_contexts(plan, model)
    spec = model.site_map(site, layer)
    read_spec = model.site_map(sae.reads, layer) if sae.reads is not None else None
    if sae.reads is not None:
        notes.append(f"the substitute is a transcoder: it reads {hook_name(sae.reads, layer)} ({sae.reads}, the MLP's "
                     f"input) and writes {hook_name(site, layer)}; x is the true MLP output, x̂ the transcoder's output "
                     "(its rows are named sae) and every baseline is built around x with its error")
    check_skip(plan, sae)
    if config.second_order:  # before anything is measured: a family whose suffix cannot be replayed is refused
        check_replayable(model)
    executor, execution = choose(config, model, spec, layer, contexts)
    reference = reference_model(plan, model)
    loaded = Loaded(plan, model, sae, site, layer, spec, contexts, center, executor, execution, notes, fit_contexts,
                    route, reference=reference, held_out=found, read_spec=read_spec)
    # fitted on float32 activations in a low-precision run too: the draws of a float32 run
    fitted = fit_perturbations(loaded if reference is None else dataclasses.replace(loaded, model=reference))
    if fitted:
        loaded.execution = {**execution, "fitted": fitted}
    return loaded  # a low-precision run is checked where its job is loaded (klgap/job/cells.py: load_job)


def check_fits(model: LoadedModel | ModelShape, name: str, site: str, layer: int, context_len: int,
               sae: LoadedSAE | None) -> None:
    """The run fits the model: its layer exists, its contexts are not too long, and the SAE (when known) is as
    wide as the site. `model` is the loaded model, or its shape read from its config before the weights load."""
    if not 0 <= layer < model.n_layers:
        raise KlgapError(f"--layer {layer} is out of range for {name}: valid layers are 0..{model.n_layers - 1}")
    if context_len > model.max_context:
        raise KlgapError(f"--context-len {context_len} exceeds {name}'s maximum context of {model.max_context}")
    width = model.site_widths.get(site)
    if sae is not None and sae.reads is not None:  # a transcoder: d_in is the read site's width, d_out the written's
        read_width = model.site_widths.get(sae.reads)
        if read_width is not None and sae.d_in != read_width:
            raise KlgapError(f"the transcoder {sae.source!r} has d_in={sae.d_in} but {name} {sae.reads} (what it "
                             f"reads) is {read_width} wide; it was trained on another model")
        if width is not None and sae.width_out != width:
            raise KlgapError(f"the transcoder {sae.source!r} has d_out={sae.width_out} but {name} {site} (what it "
                             f"writes) is {width} wide; it was trained on another model")
    elif sae is not None and width is not None and sae.d_in != width:
        raise KlgapError(f"the SAE {sae.source!r} has d_in={sae.d_in} but {name} {site} is {width} wide; "
                         "it was trained on another model or site")


def check_skip(plan: RunPlan, sae: LoadedSAE) -> None:
    """An intervention that drops a skip transcoder's skip term (``transcoder_no_skip``) needs a substitute with one."""
    asked = [i.name for i in plan.interventions if without_skip(i.perturbation)]
    if asked and sae.skip is None:
        what = "a transcoder without a skip term" if sae.transcoder else "an SAE"
        raise KlgapError(f"--interventions {asked[0]} measures a skip transcoder without its skip term, but "
                         f"{sae.source!r} is {what}; drop it or give a skip transcoder (W_skip)")


def n_fit_contexts(config: RunConfig) -> int:
    """Contexts that hold --fit-tokens fit tokens (the first position excluded, as measured); 0 without it."""
    if config.fit_tokens is None:
        return 0
    return max(2, -(-config.fit_tokens // (config.context_len - (1 if config.skip_first_position else 0))))


def draw_contexts(plan: RunPlan, model: LoadedModel) -> tuple[Tensor, Tensor | None]:
    """The run's contexts ``[n_contexts ctx]`` and, with --fit-tokens, the fit contexts ``[n_fit ctx]`` (int64, CPU).

    One draw of n_contexts + n_fit contexts from the token source with the run's seed: the measured ones first
    (the contexts a run without --fit-tokens measures, for the built-in sources, whose draws are prefixes of
    each other), the fit ones after them, so the two never share a context."""
    config = plan.config
    n_fit = n_fit_contexts(config)
    n_all = config.n_contexts + n_fit
    contexts = plan.tokens.obj.contexts(model, n_all, config.context_len, config.seed, config.prepend_bos,
                                        plan.tokens.arg)
    needs = f"--tokens {config.tokens}" + (f" and --fit-tokens {config.fit_tokens}" if n_fit else "")
    if contexts.dim() == 2 and contexts.shape[1] == config.context_len and len(contexts) < n_all:
        raise KlgapError(f"token source {plan.tokens.name!r} gave {len(contexts)} contexts of {config.context_len} "
                         f"tokens but {needs} need{'s' * (not n_fit)} {n_all}; nothing was measured: give "
                         f"--tokens {(len(contexts) - n_fit) * config.context_len} or less, or a source with more text")
    if contexts.shape != (n_all, config.context_len):
        raise KlgapError(f"token source {plan.tokens.name!r} returned {tuple(contexts.shape)}, expected "
                         f"{(n_all, config.context_len)}")
    contexts = contexts.to(torch.long).cpu()
    check_token_ids(contexts, model, plan.tokens.name)
    return contexts[: config.n_contexts], (contexts[config.n_contexts :] if n_fit else None)


def count_layers(config: RunConfig) -> int:
    """The model's number of layers (a study over ``--layer all``): the model is loaded (and held) to count them."""
    return load_model(config.model, pick_device(config.device), getattr(torch, config.dtype),
                      Placement(config.device_map, bool(config.remote))).n_layers
def check_token_ids(ids: Tensor, model: LoadedModel, source: str) -> None:
    """Token ids ``[n ctx]`` a model can embed: every id in 0..vocab_size-1 (else one line naming the first one
    outside, where it is, and the source that gave it)."""
    bad = (ids < 0) | (ids >= model.vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise KlgapError(f"token source {source!r} gave token id {int(ids[row, col])} (context {row}, position {col}; "
                         f"{int(bad.sum())} ids in all) outside {model.name}'s vocabulary of {model.vocab_size} "
                         f"(ids 0..{model.vocab_size - 1})")


FIT_TOKENS = 8192  # without --fit-tokens: clean activations of the run's first contexts handed to fitted perturbations


@torch.no_grad()
def fit_perturbations(run: Loaded) -> dict[str, Any]:
    """Fit every perturbation that declares ``fit(acts [n, d])``, ``fit_error(x [n, d], x_hat [n, d])`` or
    ``fit_sae(x, x_hat, l0 [n], d_sae)`` on the clean site activations (centred like the SAE's input; x̂ the SAE's
    reconstruction, l0 its active features per token) of the fit tokens: with --fit-tokens the fit contexts drawn
    after the measured ones, else the run's first contexts (up to FIT_TOKENS tokens). The same tokens on every
    resume. Returns, per fitted perturbation, which tokens it saw and what its ``fit_summary()`` says."""
    perturbations = [i.perturbation for i in run.interventions] + ([run.sample.perturbation] if run.sample else [])
    needing, needing_error = fittable(perturbations), error_fittable(perturbations)
    needing_sae, needing_contexts = sae_fittable(perturbations), context_fittable(perturbations)
    if not needing and not needing_error and not needing_sae and not needing_contexts:
        return {}
    config, model = run.config, run.model
    first = 1 if config.skip_first_position else 0
    if run.fit_contexts is not None:
        fit_ids, n_ctx = run.fit_contexts, len(run.fit_contexts)
        source = f"{n_ctx} contexts drawn after the measured ones (--fit-tokens {config.fit_tokens}; disjoint from them)"
    else:
        per_context = config.context_len - first
        n_ctx = max(2, min(len(run.contexts), -(-FIT_TOKENS // per_context)))
        fit_ids, source = run.contexts[:n_ctx], "the run's first contexts"
    fitted = {p.name: fit_on_contexts(run, p, fit_ids, source) for p in needing_contexts}
    if not needing and not needing_error and not needing_sae:
        return fitted
    chunks, chunks_hat, chunks_l0 = [], [], []
    special = special_token_ids(model.tokenizer)
    for start in range(0, n_ctx, config.batch_size):
        ids = fit_ids[start:min(start + config.batch_size, n_ctx)].to(model.device)
        keep = kept(ids, config.mask_special, special)  # [b n]: the tokens the run patches (--mask-special)
        keep = keep.to(model.device)
        if run.read_spec is not None:  # a transcoder: x at the site it writes, what it reads beside it
            read, written = activations.collect_many(model, [run.read_spec, run.spec], ids)
            x, reads = written[keep].float(), read[keep].float()
        else:
            x, reads = activations.collect(model, run.spec, ids)[keep].reshape(-1, run.sae.d_in).float(), None
        if needing_error or needing_sae:
            view = SaeView.of(x, run.sae, run.center, reads=reads)
            chunks.append(view.x)
            chunks_hat.append(view.x_hat)
            chunks_l0.append(view.stats["l0"])
        else:
            chunks.append(x - x.mean(-1, keepdim=True) if run.center else x)  # what SaeView.of hands the perturbations
    acts = torch.cat(chunks)
    finite = torch.isfinite(acts).all(-1)
    acts = acts[finite]
    for p in needing:
        p.fit(acts)
    if needing_error or needing_sae:
        acts_hat = torch.cat(chunks_hat)[finite]
        keep = torch.isfinite(acts_hat).all(-1)
        for p in needing_error:
            p.fit_error(acts[keep], acts_hat[keep])
        for p in needing_sae:
            p.fit_sae(acts[keep], acts_hat[keep], torch.cat(chunks_l0)[finite][keep], run.sae.d_sae)
    return fitted | {p.name: {"n_activations": int(acts.shape[0]), "n_contexts": n_ctx, "source": source,
                              **fit_summary(p)} for p in [*needing, *needing_error, *needing_sae]}


@torch.no_grad()
def fit_on_contexts(run: Loaded, perturbation: ContextFittablePerturbation, fit_ids: Tensor,
                    source: str) -> dict[str, Any]:
    """Fit `perturbation` (klgap.protocols.ContextFittablePerturbation) on the clean activations ``[c n d]`` at
    every position (position 0 and masked tokens included) of the first ``n_fit_contexts`` of `fit_ids`, the
    fit source's contexts (all of the run's when it measures fewer: then fewer). What it saw, for run.json."""
    model, config = run.model, run.config
    ids = run.contexts if run.fit_contexts is None else fit_ids  # without --fit-tokens: the run's first contexts
    ids = ids[: perturbation.n_fit_contexts]
    chunks = []
    for start in range(0, len(ids), config.batch_size):
        x = activations.collect(model, run.spec, ids[start : start + config.batch_size].to(model.device)).float()
        chunks.append(x - x.mean(-1, keepdim=True) if run.center else x)  # [b n d], as SaeView.of centres
    perturbation.fit_contexts(torch.cat(chunks))
    return {"n_activations": int(ids.numel()), "n_contexts": len(ids), "every_position": True,
            "source": source, **fit_summary(perturbation)}
