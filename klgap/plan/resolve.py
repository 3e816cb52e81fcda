"""Resolve before loading: a RunConfig becomes a typed RunPlan, with every name, number and path checked.

Nothing here loads weights or imports transformers: the model is found through its adapter (a registered
name, or a plugin's ``resolve_model_adapter`` for a repo id or folder), the SAE spec is routed to the loader
that will read it (and checked by that loader's ``check`` where it has one: hook name, hub repo), each
intervention is built from its parsed parameters, and the token source is looked up. A bad name, path or
number is refused here, in well under a second after the plugins are imported. ``replicate``, ``curve``,
``train-sae``, ``--dry-run`` and the Python API all go through :func:`resolve` (a command's sites each once:
klgap.job.plan.plan_job).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klgap.plan.config import RunConfig
from klgap.plan.dtypes import run_dtype
from klgap.job.distributed import cuda_device, read_world
from klgap.errors import KlgapError, unknown
from klgap.plugins.manager import ModelRef, get_host, model_adapter
from klgap.plugins.capabilities import as_perturbation, check_sae_spec, find_default_sae, token_split
from klgap.protocols import (LoadedModel, LoadedSAE, ModelSAENames, Perturbation, Placement, PlacingModelAdapter,
                             SAECheck, TokenRole)
from klgap.plan.sites import hook_name, parse_hook_name
from klgap.plan.grid import sae_for, templated
from klgap.plan.specs import parse_intervention, split_spec


@dataclass(frozen=True)
class SAERoute:
    """An SAE spec and the loader that will read it (nothing loaded yet).

    spec:    as the user wrote it (``~`` expanded); the report's ``sae.source`` comes from the loaded SAE.
    loader:  the registered loader name; ``arg`` is what its ``load`` receives (the spec minus ``NAME:``).
    checked: what the loader's ``check`` says without loading (hook name, hub repo), when it declares one.
    """

    spec: str
    loader: str
    arg: str
    plugin: str
    checked: SAECheck | None = None

    @property
    def hook_name(self) -> str | None:
        return self.checked.hook_name if self.checked is not None else None

    @property
    def repo_id(self) -> str | None:
        return self.checked.repo_id if self.checked is not None else None

    @property
    def obj(self) -> Any:
        return get_host().registry("sae_loader").get(self.loader)


def recorded_name(registered: str, params: dict[str, str], own: str) -> str:
    """The name an intervention's rows, report and figures carry. The perturbation's own ``name`` when it takes
    no parameters or names itself apart from its registered name (``cosine_matched(cos=0.8,norm_frac=0.9)``);
    else ``NAME(key=value,...)`` (keys sorted), so ``my_noise`` and ``my_noise:scale=3`` are two interventions."""
    if not params or own != registered:
        return own
    return f"{registered}({','.join(f'{key}={params[key]}' for key in sorted(params))})"


@dataclass(frozen=True)
class Intervention:
    """One entry of ``--interventions``: its spec, the registered factory's name and plugin, and the built
    perturbation. ``name`` labels its rows (:func:`recorded_name`)."""

    spec: str
    registered: str
    params: dict[str, str]
    plugin: str
    perturbation: Perturbation = field(compare=False)

    @property
    def name(self) -> str:
        return recorded_name(self.registered, self.params, str(self.perturbation.name))


@dataclass(frozen=True)
class TokenSourceRef:
    """``--dataset NAME[:ARG]``: the registered source, its argument and its plugin; or, from Python, a
    source object of the caller's (``given``: token ids or texts handed to ``klgap.measure``).

    split / whole / chosen: which split `arg` reads (klgap.protocols.TokenSplit: None, the whole source), the
    argument naming the source without a split, and whether klgap chose the split for the run's role."""

    name: str
    arg: str | None
    plugin: str
    given: Any = field(default=None, compare=False)
    split: str | None = None
    whole: str | None = None
    chosen: bool = False

    @property
    def obj(self) -> Any:
        return self.given if self.given is not None else get_host().registry("token_source").get(self.name)

    @property
    def spec(self) -> str:
        """``NAME:ARG`` as ``--dataset`` would name what is read (the split included)."""
        return f"{self.name}:{self.arg}" if self.arg else self.name

    @property
    def unsplit(self) -> str:
        """``NAME[:WHOLE]``: the same source with no split named (train-sae reads its train split)."""
        return f"{self.name}:{self.whole}" if self.whole else self.name


def token_source(dataset: str, role: TokenRole) -> TokenSourceRef:
    """``--dataset NAME[:ARG]`` looked up, with the split a run in `role` reads: the one named, or, when none is,
    the source's split for the role (klgap.protocols.SplitTokenSource: train-sae reads a train split, a
    measurement an eval split); a source without splits is read whole."""
    name, arg = split_spec(dataset)
    sources = get_host().registry("token_source")
    found = token_split(sources.get(name), arg or None, role)
    return TokenSourceRef(name, found.arg, sources.entries[name].plugin, split=found.split, whole=found.whole,
                          chosen=found.chosen)


@dataclass(frozen=True)
class RunPlan:
    """Everything one run will do, resolved and checked; loading it is :func:`klgap.job.loading.load_plan`."""

    config: RunConfig
    model: ModelRef
    device: torch.device
    dtype: torch.dtype
    placement: Placement
    sae: SAERoute | LoadedSAE | None  # an SAE object from Python; None: the model's default pretrained SAE
    site: str | None  # None only when the SAE's hook name is known only once it is loaded
    layer: int | None
    interventions: tuple[Intervention, ...]
    sample: Intervention | None  # many_samples: the random perturbation drawn N times
    tokens: TokenSourceRef

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.interventions]


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must be a device torch knows. Under torchrun (or
    srun) with several ranks, cuda is each rank's ``cuda:LOCAL_RANK`` (klgap.job.distributed)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KlgapError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KlgapError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise KlgapError(f"device {name!r} asked for, but this machine shows {count} GPU{'s' if count != 1 else ''}"
                             f": valid: cuda, {', '.join(f'cuda:{i}' for i in range(count))}")
        device = torch.device(cuda_device(name, read_world(), count))
    return device


def build_intervention(spec: str) -> Intervention:
    """`"cosine_matched:cos=0.8"` -> the registered factory called with its parameters."""
    name, params = parse_intervention(spec)
    registry = get_host().registry("perturbation")
    factory = registry.get(name)
    try:
        perturbation = as_perturbation(factory(**params), spec)
    except TypeError as exc:
        raise KlgapError(f"intervention {spec!r}: bad parameters {sorted(params)} ({exc})") from exc
    return Intervention(spec, name, params, registry.entries[name].plugin, perturbation)


def build_interventions(specs: list[str]) -> tuple[Intervention, ...]:
    built = [build_intervention(s) for s in specs]
    names = [i.name for i in built]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        specs_of = [i.spec for i in built if i.name == dupes[0]]
        raise KlgapError(f"intervention {dupes[0]!r} is listed twice in --interventions ({' and '.join(specs_of)} "
                         "name the same perturbation)")
    return tuple(built)


def route_sae(spec: str) -> SAERoute:
    """Route an SAE spec to its loader: `NAME:ARG` by name, a bare path to the first loader that knows it.

    The loader's ``check`` (if it declares :class:`klgap.protocols.SAEChecker`) says what the spec names
    without loading it (klgap.plugins.capabilities.check_sae_spec); its errors (an unknown release or SAE id, a folder
    without its config) surface here."""
    spec = os.path.expanduser(spec)
    loaders = get_host().registry("sae_loader")
    prefix, rest = split_spec(spec)
    sep = rest is not None
    if sep and prefix in loaders:
        name, arg = prefix, rest
    else:
        name = next((n for n in loaders.names() if loaders.get(n).can_load(spec)), None)
        arg = spec
        if name is None:
            if sep and "/" not in prefix and "\\" not in prefix and len(prefix) > 1 and not Path(spec).exists():
                raise unknown("SAE loader", prefix, loaders.names())
            if not Path(spec).exists():
                raise KlgapError(
                    f"SAE {spec!r} is neither an existing path nor LOADER:ARG; valid forms: "
                    "sae_lens:RELEASE/SAE_ID, a folder with cfg.json + sae_weights.safetensors, a .safetensors file"
                    f" (loaders: {', '.join(loaders.names())})"
                )
            raise KlgapError(
                f"no SAE loader recognises {spec!r}; prefix it with one of: {', '.join(loaders.names())} "
                "(e.g. sae_lens:RELEASE/ID)"
            )
    found = check_sae_spec(loaders.get(name), arg)
    return SAERoute(spec, name, arg, loaders.entries[name].plugin, found)


def default_sae(model: LoadedModel | ModelSAENames, site: str, layer: int) -> tuple[SAERoute, str]:
    """The pretrained SAE a run without ``--sae`` uses: the first SAE loader that names one
    (:class:`klgap.protocols.DefaultSAEFinder`), routed and checked; else the error that says to train one."""
    found = find_default_sae(get_host().registry("sae_loader"), model, site, layer)
    if found is not None:
        spec, note = found
        return route_sae(spec), note
    raise KlgapError(
        f"no --sae given and no pretrained SAE is known for {model.name} {hook_name(site, layer)}; "
        f"train one with `klgap train-sae --model {model.name} --site {site} --layer {layer} --out DIR` "
        "and pass --sae DIR"
    )


def site_of(config: RunConfig, sae: SAERoute | None, hook: str | None = None) -> tuple[str | None, int | None]:
    """Site and layer from the flags, else from the SAE's hook name; a disagreement is an error."""
    site, layer = config.site, config.layer
    hook = hook or (sae.hook_name if sae is not None else None)
    if hook:
        sae_site, sae_layer = parse_hook_name(hook)
        if (site is not None and site != sae_site) or (layer is not None and layer != sae_layer):
            raise KlgapError(
                f"the SAE {sae.spec if sae else '?'!r} was trained on {hook} (site {sae_site}, layer {sae_layer}) "
                f"but --site {site} --layer {layer} was given; drop them or pick a matching SAE"
            )
        site, layer = sae_site, sae_layer
    return site, layer


def resolve(config: RunConfig, *, model: ModelRef | None = None, sae: LoadedSAE | None = None,
            tokens: TokenSourceRef | None = None, role: TokenRole = "measure") -> RunPlan:
    """Check one site's `config` against the installed plugins and return what measuring it will do; loads nothing.
    A command's sites (a study's, a joint run's) are each resolved so by klgap.job.plan.plan_job.

    From Python (klgap.api) the model, the SAE and the tokens may be objects the caller holds: they replace
    what ``config.model`` / ``config.sae`` / ``config.dataset`` would name. `role`: what the tokens are read for
    (``train``: train-sae; ``measure``: every run), which picks the split of a ``--dataset`` that names none
    (:func:`token_source`); the plan's config records the dataset as resolved (``sample`` -> ``sample:eval``)."""
    if config.joint:
        raise KlgapError("a joint config is several sites: plan it with klgap.job.plan.plan_job")
    config.validate()
    model = model if model is not None else model_adapter(config.model)
    placement = Placement(config.device_map, bool(config.remote))
    if not placement.local and not isinstance(model.adapter, PlacingModelAdapter):
        what = "--remote" if placement.remote else "--device-map"
        raise KlgapError(
            f"model {config.model!r} cannot take {what}: its adapter loads it locally only; {what} works with "
            "Hugging Face hub models (gpt2, pythia-70m-deduped, a hub repo id, ...)"
        )
    if placement.device_map is not None and read_world().distributed:
        raise KlgapError(f"--device-map {placement.device_map!r} spreads one model over this node's GPUs, but "
                         f"{read_world().size} ranks run: start one process (no torchrun/srun ranks) for --device-map")
    specs = list(config.interventions)
    interventions = build_interventions(specs)
    if config.mode == "many_samples" and "sae" not in [i.name for i in interventions]:  # (transcoder names it too)
        interventions = build_interventions(["sae", *specs])
    sample = None
    if config.mode == "many_samples":
        sample = build_intervention(config.sample_intervention)
        if not sample.perturbation.stochastic:
            raise KlgapError(
                f"--sample-intervention {config.sample_intervention!r} is not random; many-samples mode needs "
                "one that is, e.g. epsilon_random or theta_random"
            )
    if tokens is None:  # the split read is what the config records (config.dataset as resolved)
        tokens = token_source(config.dataset, role)
        config = dataclasses.replace(config, dataset=tokens.spec)
    device = pick_device(config.device)
    if sae is not None:
        site, layer = site_of(config, None, sae.hook_name)
        if site is None or layer is None:
            raise KlgapError(f"the SAE {sae.source!r} does not say where it was trained (no hook name in its cfg); "
                             "give site= and layer=")
    else:
        if templated(config.sae):  # one (site, layer): its SAE named by the template, as a study's cells are
            if config.site is None or config.layer is None:
                raise KlgapError(f"--sae {config.sae!r} has {{site}}/{{layer}} in it: give --site and --layer to fill "
                                 "them in (e.g. --site mlp_out --layer 3)")
            config = dataclasses.replace(config, sae=sae_for(config.sae, config.site, config.layer))
        sae = route_sae(config.sae) if config.sae else None
        site, layer = site_of(config, sae)
    if sae is None and (site is None or layer is None):
        raise KlgapError("give --site and --layer (or an --sae whose hook name names them)")
    return RunPlan(config, model, device, run_dtype(config.dtype, device), placement, sae, site, layer,
                   interventions, sample, tokens)


__all__ = ["Intervention", "RunPlan", "SAERoute", "TokenSourceRef", "build_intervention", "build_interventions",
           "default_sae", "pick_device", "recorded_name", "resolve", "route_sae", "site_of", "token_source"]
