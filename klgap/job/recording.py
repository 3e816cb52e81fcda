"""What a run's folder says about it: run.json (:func:`make_record`) and the identity a resume must match
(:func:`run_identity`, written as run_config.json by klgap/job/folder.py), both from a loaded run (klgap/job/loading.py).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from klgap.job.distributed import SINGLE, World
from klgap.job.loading import Loaded
from klgap.plugins.capabilities import baseline_label
from klgap.plugins.manager import get_host
from klgap.protocols import LoadedSAE
from klgap.job.record import InterventionRef, RunRecord
from klgap.plan.resolve import route_sae
from klgap.report.schema import SCHEMA_VERSION, ModuleRef, PluginRef, SAEInfo
from klgap.plan.sites import hook_name

__all__ = ["json_safe", "make_record", "plugin_ref", "run_identity"]


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
    from klgap.report.provenance import provenance

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
                    d_in=run.sae.d_in, d_sae=run.sae.d_sae, info=json_safe(run.sae.info)),
        mode=cfg.mode,
        context_len=cfg.context_len,
        first_position="excluded (not patched, not measured)" if cfg.skip_first_position else "included",
        last_position="patched, not measured" if cfg.drop_last_position else "measured",
        centered_activations=run.center,
        execution=json_safe(run.execution),
        interventions=[InterventionRef(name=i.name, spec=i.spec, plugin=plugin_ref(i.plugin),
                                       baseline=baseline_label(i.perturbation)) for i in plan.interventions],
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



def json_safe(obj: Any) -> Any:
    """`obj` as plain JSON values (what run.json and the report can hold: NaN as null, tensors as numbers)."""
    from klgap.report.build import _clean

    return json.loads(json.dumps(_clean(obj), default=str))


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
