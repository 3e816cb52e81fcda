"""What a cell's folder says about it: run.json (:func:`make_record`, :func:`joint_record`) and the identity a
resume must match (:func:`run_identity`, :func:`joint_identity`, written as run_config.json by klgap/job/folder.py),
from a loaded run (klgap/job/loading.py) or a loaded joint cell (klgap/job/loaded.py).
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from klgap.forward.finite import named_tensors
from klgap.job.distributed import SINGLE, World
from klgap.job.loaded import LoadedCell
from klgap.job.loading import Loaded
from klgap.job.masks import describe as describe_mask
from klgap.job.masks import special_token_ids
from klgap.job.record import SINGLE_DIR, InterventionRef, RunRecord
from klgap.plan.sites import hook_name
from klgap.plugins.capabilities import baseline_label, definition
from klgap.plugins.manager import get_host
from klgap.protocols import LoadedSAE
from klgap.report.provenance import provenance
from klgap.report.numbers import json_safe
from klgap.report.schema import SCHEMA_VERSION, JointSite, ModuleRef, PluginRef, SAEInfo

__all__ = ["joint_identity", "joint_record", "json_safe", "make_record", "plugin_ref", "run_identity", "sae_digest"]


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
    plan, cfg = run.plan, run.config
    plugins = {f"model:{cfg.model}": plugin_ref(plan.model.plugin),
               f"token_source:{plan.tokens.name}": plugin_ref(plan.tokens.plugin)}
    if isinstance(plan.sae, LoadedSAE):
        plugins["sae_loader:in_memory"] = PluginRef(plugin="python", version=None)
    else:
        plugins[f"sae_loader:{run.route.loader}"] = plugin_ref(run.route.plugin)
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
                    d_in=run.sae.d_in, d_sae=run.sae.d_sae, info=json_safe(run.sae.info),
                    reads=hook_name(run.sae.reads, run.layer) if run.sae.reads is not None else None,
                    d_out=run.sae.d_out, skip=run.sae.skip is not None),
        mode=cfg.mode,
        context_len=cfg.context_len,
        first_position="excluded (not patched, not measured)" if cfg.skip_first_position else "included",
        masked_tokens=describe_mask(cfg.mask_special, special_token_ids(run.model.tokenizer)),
        last_position="patched, not measured" if cfg.drop_last_position else "measured",
        centered_activations=run.center,
        execution=json_safe(run.execution),
        interventions=[InterventionRef(name=i.name, spec=i.spec, plugin=plugin_ref(i.plugin),
                                       baseline=baseline_label(i.perturbation),
                                       definition=definition(i.perturbation)) for i in plan.interventions],
        sample_intervention=plan.sample.name if plan.sample else None,
        n_contexts=len(run.contexts),
        n_batches=run.n_batches,
        notes=run.notes,
        held_out=run.held_out,
        config=cfg.to_dict(),
        seed=cfg.seed,
        device=str(run.model.device),
        world_size=world.size,
        dtype=str(run.model.dtype).removeprefix("torch."),  # what the model computed in (--dtype auto: its choice)
        precision=run.precision,
        dataset=cfg.dataset,
        plugins=plugins,
        provenance=provenance(),
    )



def run_identity(run: Loaded) -> dict[str, Any]:
    """What makes two runs the same run (resume only into an identical one). The device's kind, not its index:
    the ranks of a run sit on cuda:0, cuda:1, ... and a killed run resumes on any of them."""
    identity = run.config.to_dict()
    identity.pop("no_fast")  # both execution paths give the same numbers (tests/core/test_engine.py)
    if not identity.get("joint"):  # a single-site run's identity as before joint runs existed (resumes across)
        identity.pop("joint", None)
    if not identity.get("joint_subsets"):  # joint runs written before --joint-subsets existed still resume
        identity.pop("joint_subsets", None)
    if not identity.get("joint"):  # a site alone has no joint baseline: its folder resumes whatever the joint's says
        identity.pop("joint_baseline", None)
    if not identity["drop_last_position"]:  # the default: folders written before the flag existed still resume
        identity.pop("drop_last_position")
    if identity.get("fit_tokens") is None:  # likewise for --fit-tokens
        identity.pop("fit_tokens", None)
    if not identity.get("second_order"):  # likewise for --second-order
        identity.pop("second_order", None)
    identity.update(site=run.site, layer=run.layer, sae=run.sae.source, sae_digest=sae_digest(run.sae),
                    device=run.model.device.type)
    if identity["dtype"] == "auto":  # resume only in the dtype the run chose (another machine may choose another)
        identity["dtype"] = str(run.model.dtype).removeprefix("torch.")
    return identity


def joint_identity(cell: LoadedCell) -> dict[str, Any]:
    """What makes two joint cells the same (resume only into an identical one)."""
    identity = cell.config.to_dict()
    identity.pop("no_fast")
    if not identity["joint_subsets"]:  # joint runs written before --joint-subsets existed still resume
        identity.pop("joint_subsets")
    identity["sites"] = [run_identity(run) for run in cell.runs]
    return identity


def joint_record(cell: LoadedCell, world: World = SINGLE) -> RunRecord:
    """run.json of a joint cell: the lowest site's facts, the cell's config and execution, and every site (its
    folder alone relative to this cell's: ``../../`` up from a subset's)."""
    up = "../" * cell.path.count("/") + ("../" if cell.path != "." else "")
    lowest = make_record(cell.runs[0], world)
    sites = [JointSite(site=run.site, layer=run.layer, hook_name=record.hook_name, sae=record.sae,
                       path=f"{up}{SINGLE_DIR}/{run.site}_L{run.layer:02d}")
             for run, record in ((run, make_record(run, world)) for run in cell.runs)]
    notes = list(dict.fromkeys(note for run in cell.runs for note in run.notes))
    notes.append("joint run: every site below is patched in the same forward, each with its own SAE (x, x̂, ε "
                 "of the activation that forward gives it); its baselines sized by --joint-baseline "
                 f"{cell.config.joint_baseline}; site, layer and sae_metrics here are the lowest site's; each site "
                 "alone: " + ", ".join(site.path for site in sites))
    return lowest.model_copy(update={"config": json_safe(cell.config.to_dict()), "joint": sites,
                                     "execution": json_safe(cell.execution), "notes": notes,
                                     "precision": cell.precision})  # the joint cell's own check


def sae_digest(sae: LoadedSAE) -> str | None:
    """sha256 of an SAE's weights as loaded (every tensor's name, dtype, shape and bytes, in name order), so a
    run resumes only with the SAE it started with, whatever file format or path it came from. None for an SAE
    object that is not a torch module (nothing to hash)."""
    import torch

    found = sorted(named_tensors(sae.module), key=lambda item: item[0])
    if not found:
        return None
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in found:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
