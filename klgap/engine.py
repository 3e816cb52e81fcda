"""The run: resolve -> load -> execute -> parts + run.json -> report.

:func:`klgap.resolve.resolve` checks a RunConfig and gives a RunPlan (nothing loaded); :func:`load_plan` loads
its SAE, model and tokens and picks an executor (klgap/executors.py); :func:`open_run` binds it to a folder and
writes run.json (klgap/record.py); each batch is measured by its mode (klgap/modes.py) and written as a part
before the next starts, so a killed run resumes; :func:`finish_run` builds the report from the folder alone
(klgap/report.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klgap import activations, metrics, modes
from klgap.config import RunConfig
from klgap.distributed import SINGLE, World
from klgap.errors import KlgapError, WriteError
from klgap.executors import Executor, choose
from klgap.finite import NonFiniteLogits
from klgap.plugins import ModelRef, get_host, model_adapter
from klgap.capabilities import error_fittable, error_splitter, fittable
from klgap.protocols import ErrorSplitter, LoadedModel, LoadedSAE, Placement, SiteSpec
from klgap.record import InterventionRef, RunRecord, write_record
from klgap.saecheck import check_loaded_sae
from klgap.resolve import (Intervention, JointPlan, RunPlan, SAERoute, default_sae, pick_device, resolve, route_sae,
                           site_of)
from klgap.rundir import RunDir, atomic_write_json
from klgap.schema import SCHEMA_VERSION, ModuleRef, PluginRef, Report, SAEInfo, as_json
from klgap.sites import hook_name

log = logging.getLogger("klgap")

__all__ = ["Loaded", "OpenRun", "finish_run", "load_model", "load_plan", "load_sae", "open_run", "pick_device",
           "prepare", "report_folder", "run", "run_shared"]


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


# ----------------------------------------------------------------------------- loading

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
    contexts, fit_contexts = draw_contexts(plan, model)
    spec = model.site_map(site, layer)
    executor, execution = choose(config, model, spec, layer, contexts)
    loaded = Loaded(plan, model, sae, site, layer, spec, contexts, center, executor, execution, notes, fit_contexts)
    fitted = fit_perturbations(loaded)
    if fitted:
        loaded.execution = {**execution, "fitted": fitted}
    return loaded


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
    return contexts[: config.n_contexts], (contexts[config.n_contexts :] if n_fit else None)


def prepare(config: RunConfig) -> Loaded:
    """Resolve and load a config (no folder): what a notebook or a benchmark measures batches with."""
    return load_plan(resolve(config))


FIT_TOKENS = 8192  # without --fit-tokens: clean activations of the run's first contexts handed to fitted perturbations


@torch.no_grad()
def fit_perturbations(run: Loaded) -> dict[str, Any]:
    """Fit every perturbation that declares ``fit(acts [n, d])`` or ``fit_error(x [n, d], x_hat [n, d])`` on the clean
    site activations (centred like the SAE's input; x̂ the SAE's reconstruction) of the fit tokens: with
    --fit-tokens the fit contexts drawn after the measured ones, else the run's first contexts (up to FIT_TOKENS
    tokens). The same tokens on every resume."""
    perturbations = [i.perturbation for i in run.interventions] + ([run.sample.perturbation] if run.sample else [])
    needing, needing_error = fittable(perturbations), error_fittable(perturbations)
    if not needing and not needing_error:
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
    chunks, chunks_hat = [], []
    for start in range(0, n_ctx, config.batch_size):
        ids = fit_ids[start:min(start + config.batch_size, n_ctx)].to(model.device)
        x = activations.collect(model, run.spec, ids)[:, first:].reshape(-1, run.sae.d_in).float()
        if needing_error:
            view = modes.SaeView.of(x, run.sae, run.center)
            chunks.append(view.x)
            chunks_hat.append(view.x_hat)
        else:
            chunks.append(x - x.mean(-1, keepdim=True) if run.center else x)  # what SaeView.of hands the perturbations
    acts = torch.cat(chunks)
    finite = torch.isfinite(acts).all(-1)
    acts = acts[finite]
    for p in needing:
        p.fit(acts)
    if needing_error:
        acts_hat = torch.cat(chunks_hat)[finite]
        keep = torch.isfinite(acts_hat).all(-1)
        for p in needing_error:
            p.fit_error(acts[keep], acts_hat[keep])
    return {p.name: {"n_activations": int(acts.shape[0]), "n_contexts": n_ctx, "source": source}
            for p in [*needing, *needing_error]}


# ----------------------------------------------------------------------------- the record


def plugin_ref(plugin: str) -> PluginRef:
    """A plugin's name and the version of the package that installed it."""
    package, plugin_version = get_host().dists.get(plugin, (None, None))
    if plugin_version is None and package:
        try:
            plugin_version = version(package)
        except PackageNotFoundError:
            plugin_version = None
    return PluginRef(plugin=plugin, version=plugin_version)


def make_record(run: Loaded, world: World = SINGLE) -> RunRecord:
    """run.json of a loaded run: what was measured, how, and with which plugins (and by how many ranks)."""
    from klgap.provenance import provenance

    plan, cfg = run.plan, run.config
    plugins = {f"model:{cfg.model}": plugin_ref(plan.model.plugin),
               f"token_source:{plan.tokens.name}": plugin_ref(plan.tokens.plugin)}
    if isinstance(plan.sae, LoadedSAE):
        plugins["sae_loader:in_memory"] = PluginRef(plugin="python", version=None)
    else:
        loader = plan.sae if plan.sae is not None else route_sae(run.sae.source)
        plugins[f"sae_loader:{loader.loader}"] = plugin_ref(loader.plugin)
    for i in (*plan.interventions, *([plan.sample] if plan.sample else [])):
        plugins[f"perturbation:{i.registered}"] = plugin_ref(i.plugin)
    return RunRecord(
        schema_version=SCHEMA_VERSION,
        model=run.model.name,
        site=run.site,
        layer=run.layer,
        hook_name=hook_name(run.site, run.layer),
        module=ModuleRef(path=run.spec.module, io=run.spec.io, index=run.spec.index),
        sae=SAEInfo(source=run.sae.source, hook_name=run.sae.hook_name, architecture=run.sae.architecture,
                    d_in=run.sae.d_in, d_sae=run.sae.d_sae, info=_json_safe(run.sae.info)),
        mode=cfg.mode,
        context_len=cfg.context_len,
        first_position="excluded (not patched, not measured)" if cfg.skip_first_position else "included",
        last_position="patched, not measured" if cfg.drop_last_position else "measured",
        centered_activations=run.center,
        execution=_json_safe(run.execution),
        interventions=[InterventionRef(name=i.name, spec=i.spec, plugin=plugin_ref(i.plugin)) for i in plan.interventions],
        sample_intervention=plan.sample.name if plan.sample else None,
        n_contexts=len(run.contexts),
        n_batches=run.n_batches,
        notes=run.notes,
        config=cfg.to_dict(),
        seed=cfg.seed,
        device=str(run.model.device),
        world_size=world.size,
        dtype=cfg.dtype,
        dataset=cfg.dataset,
        plugins=plugins,
        provenance=provenance(),
    )


def _json_safe(obj: Any) -> Any:
    import json

    from klgap.report import _clean

    return json.loads(json.dumps(_clean(obj), default=str))


# ----------------------------------------------------------------------------- the run


def run_identity(run: Loaded) -> dict[str, Any]:
    """What makes two runs the same run (resume only into an identical one). The device's kind, not its index:
    the ranks of a run sit on cuda:0, cuda:1, ... and a killed run resumes on any of them."""
    identity = run.config.to_dict()
    identity.pop("no_fast")  # both execution paths give the same numbers (tests/core/test_engine.py)
    if not identity.get("joint"):  # a single-site run's identity as before joint runs existed (resumes across)
        identity.pop("joint", None)
    if not identity.get("joint_subsets"):  # joint runs written before --joint-subsets existed still resume
        identity.pop("joint_subsets", None)
    if not identity["drop_last_position"]:  # the default: folders written before the flag existed still resume
        identity.pop("drop_last_position")
    if identity.get("fit_tokens") is None:  # likewise for --fit-tokens
        identity.pop("fit_tokens", None)
    identity.update(site=run.site, layer=run.layer, sae=run.sae.source, device=run.model.device.type)
    return identity


@dataclass
class OpenRun:
    """A run bound to its folder: what is loaded, and which batches it still has to measure."""

    run: Loaded
    rundir: RunDir
    record: RunRecord
    mine: list[int]  # this run's (or shard's) batches
    todo: list[int]  # those not measured yet (by this rank, once shared out: share_out)
    shard: tuple[int, int] | None = None
    world: World = SINGLE


def open_run(config: RunConfig | RunPlan, out: str | Path, overwrite: bool = False,
             shard: tuple[int, int] | None = None, world: World = SINGLE) -> OpenRun:
    """Resolve (if given a config), load, and bind to `out` (resuming what is there); writes run.json.

    With several ranks (klgap.distributed) every rank loads; rank 0 alone binds the folder and writes run.json,
    and every rank gets rank 0's list of batches still to do (its own share: :func:`share_out`)."""
    rundir = RunDir(out)
    created = rundir.check_writable()
    try:
        plan = resolve(config) if isinstance(config, RunConfig) else config
        loaded = load_plan(plan)
    except BaseException:  # a bad SAE or model: leave no folder behind that a rerun could take for a run
        if created:
            rundir.remove_if_empty()
        raise
    identity = run_identity(loaded)
    if shard is not None:
        identity["shard"] = f"{shard[0]}/{shard[1]}"
    record = make_record(loaded, world)
    mine = [i for i in range(loaded.n_batches) if shard is None or i % shard[1] == shard[0] - 1]

    def bind() -> tuple[dict[str, Any], list[int]]:
        rundir.prepare(identity, overwrite)
        write_record(rundir.root, record)
        done = rundir.reusable_batches()  # a part holding a non-finite KL is measured again
        todo = [i for i in mine if i not in done]
        if done:
            log.warning("resuming: %d of %d batches already done in %s", len(mine) - len(todo), len(mine), rundir.root)
        return identity, todo

    bound, todo = world.from_leader(bind)
    if bound != identity:  # every rank must measure the run rank 0 bound the folder to
        raise KlgapError(f"rank {world.rank} resolved another run than rank 0 ({rundir.root}): start every rank "
                         "with the same command and environment")
    return OpenRun(loaded, rundir, record, mine, todo, shard, world)


def share_out(opened: list[OpenRun]) -> None:
    """Keep in each open run only this rank's batches: every world_size-th of the batches any of them still has
    to do (one split for all, so runs that share a clean forward get the same batches on a rank)."""
    world = opened[0].world
    share = set(world.share(sorted(set().union(*(o.todo for o in opened)))))
    for o in opened:
        o.todo = [i for i in o.todo if i in share]


def finish_run(opened: OpenRun) -> Report | None:
    """Write the report and tokens table from the folder (a shard writes only its shard.json). With several
    ranks: after every rank has written its parts, rank 0 writes them; the other ranks return None."""
    rundir, world = opened.rundir, opened.world
    if world.distributed:
        log.info("rank %d of %d measured batches %s of %s", world.rank, world.size, opened.todo, rundir.root)
        world.barrier()
        if not world.leader:
            return None
    if opened.shard is not None:
        atomic_write_json(rundir.root / "shard.json", {"shard": list(opened.shard), "batches": opened.mine,
                                                        "n_batches": opened.run.n_batches})
        return None
    return report_folder(rundir.root)


def report_folder(folder: Path) -> Report:
    """Build report.json and tokens.parquet of a finished run folder from its run.json and parts alone."""
    from klgap.record import read_record
    from klgap.report import build_report

    rundir = RunDir(folder)
    record = read_record(rundir.root)
    done = len(rundir.done_batches())
    if done < record.n_batches:
        raise KlgapError(f"{str(rundir.root)!r} holds {done} of its {record.n_batches} batches; run its command "
                         "again to finish it (finished batches are kept)")
    report = build_report(record, rundir)
    try:
        rundir.write_tokens(rundir.root / "tokens.parquet")
        atomic_write_json(rundir.root / "report.json", as_json(report))
    except WriteError as exc:
        raise KlgapError(f"{exc}; every measured batch is kept in {rundir.parts}: free space, then "
                         f"`klgap report {rundir.root}` writes the report") from exc
    return report


def run(config: RunConfig | RunPlan | JointPlan, out: str | Path, overwrite: bool = False, progress: bool = True,
        shard: tuple[int, int] | None = None, world: World = SINGLE) -> Report | None:
    """Measure, writing per-batch parts as it goes; resume a killed run; write report + tokens table.

    ``shard=(i, n)`` measures only batches ``b`` with ``b % n == i - 1`` and writes no report (None is
    returned): `klgap merge` joins the n shards' parts into the report of the unsharded run. `world`: the
    ranks of a torchrun/srun launch share the batches (klgap.distributed); rank 0 returns the report. A joint
    config or plan (``joint=True``) runs as klgap/jointrun.py says.
    """
    if isinstance(config, RunConfig) and config.joint:
        config = resolve(config)
    if isinstance(config, JointPlan):
        if world.size > 1:
            raise KlgapError(f"joint runs do not share a launch of {world.size} ranks yet; run them as one process "
                             "(the sites of a joint run share each forward pass)")
        from klgap.jointrun import run_joint

        return run_joint(config, out, overwrite, progress, shard)
    opened = open_run(config, out, overwrite, shard, world)
    share_out([opened])
    _measure_todo(opened, progress)
    return finish_run(opened)


def _bar(items: list[int], desc: str, progress: bool) -> Any:
    """A progress bar over batches (tqdm's notebook or terminal bar), or the plain list when progress is off."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")


def _measure_todo(opened: OpenRun, progress: bool) -> None:
    """Measure the batches an open run still has to do, writing each part as it is finished."""
    loaded, shard = opened.run, opened.shard
    tag = f" shard {shard[0]}/{shard[1]}" if shard else ""
    for index in _bar(opened.todo, f"{loaded.config.mode} {loaded.site} L{loaded.layer}{tag}", progress):
        with _batch_named(index, loaded):
            measured = modes.measure_batch(loaded, index)
        _write_part(opened, index, measured)


def _write_part(opened: OpenRun, index: int, measured: tuple[Any, dict[str, Any]]) -> None:
    try:
        opened.rundir.write_part(index, *measured)
    except WriteError as exc:
        raise KlgapError(f"{exc}; the batches finished before it are kept: free space and run the same command "
                         "to resume") from exc


@contextmanager
def _batch_named(index: int, run: Loaded) -> Iterator[None]:
    """Non-finite clean logits stop the run at that batch, named (no part is written for it)."""
    try:
        yield
    except NonFiniteLogits as exc:
        raise KlgapError(f"batch {index} (contexts {index * run.config.batch_size}..): {exc}; nothing of this "
                         "batch was written") from exc


def run_shared(configs: list[RunConfig], outs: list[Path], overwrite: bool = False, progress: bool = True,
               shard: tuple[int, int] | None = None, world: World = SINGLE) -> list[Report | None]:
    """Several all-token runs on one model and the same tokens (a study's sites/layers): each batch's clean
    forward runs once for all of them, then each reruns only the layers above its own site.

    Falls back to one run after another when a run cannot share (another mode, no suffix replay, other tokens).
    Per-token numbers are those of separate runs (tests/core/test_engine.py)."""
    from klgap.suffix import shared_clean

    opened = [open_run(c, o, overwrite, shard, world) for c, o in zip(configs, outs, strict=True)]
    share_out(opened)
    first = opened[0].run
    can_share = len(opened) > 1 and all(
        o.run.config.mode == "all_tokens" and o.run.executor.path == "suffix-replay" and o.run.model is first.model
        and torch.equal(o.run.contexts, first.contexts) and o.run.config.batch_size == first.config.batch_size
        for o in opened
    )
    if not can_share:
        for o in opened:
            _measure_todo(o, progress)
        return [finish_run(o) for o in opened]
    for o in opened:  # known before the first batch: recorded now, so a killed study's run.json says it too
        o.run.execution["clean_forward"] = f"shared by {len(opened)} sites/layers"
        o.record = o.record.model_copy(update={"execution": _json_safe(o.run.execution)})
        if world.leader:
            write_record(o.rundir.root, o.record)
    indices = sorted(set().union(*(o.todo for o in opened)))
    for index in _bar(indices, f"all_tokens, {len(opened)} sites/layers, shared clean forward", progress):
        need = [o for o in opened if index in o.todo]
        ids = modes.batch_ids(first, index)[0].to(first.model.device)
        runners = [o.run.executor.runner for o in need]
        with _batch_named(index, first):
            clean_ref = metrics.CleanReference.of(shared_clean(runners, ids))
        for o, runner in zip(need, runners, strict=True):
            _write_part(o, index, modes.measure_batch(o.run, index, clean=(runner.site_value, clean_ref)))
            runner.site_value = None
    return [finish_run(o) for o in opened]
