"""Several sites and layers in one command: one sub-run per (site, layer), one study report over them.

`--layer 3,10,17` (or `all`, or `0-5`) and `--site mlp_out,attn_out` make the cross product. Each
sub-run is an ordinary run in ``OUT/<site>_L<layer>/`` (its own report.json, tokens.parquet, resume);
``OUT/report.json`` is the study report: every sub-run's summary, Wilcoxon p-values Holm-corrected within
each family (klgap.report.holm: the SAE against one baseline across the sites/layers; curve points apart), and the
Spearman correlation of the per-token gap between every pair of sub-runs (the same tokens are measured everywhere:
same dataset, seed and context length).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from klgap.report import stats
from klgap.plan.config import RunConfig
from klgap.job.distributed import SINGLE, World
from klgap.report.holm import apply_holm
from klgap.report.provenance import provenance
from klgap.job.folder import atomic_write_json
from klgap.plan.grid import sae_for
from klgap.report.schema import (
    BASELINE, SCHEMA_VERSION, Report, RunPairCorrelation, SiteSummary, StudyReport, StudyRun, as_json, load_report,
)


def run_study(base: RunConfig, sites: list[str], layers: list[int] | str, out: str | Path,
              overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None,
              world: World = SINGLE, checkpoints: str | None = None) -> StudyReport | None:
    """Run every (site, layer) into its own folder, then write the study report.

    checkpoints: an SAE spec (``{site}``/``{layer}`` filled in) whose checkpoints are measured, each in
    ``OUT/<site>_L<layer>/step-XXXXXX/``; the study report gets its over-training section (klgap/job/checkpoint_study.py).

    With ``shard=(i, n)`` every sub-run measures only its share of batches and no report is written. The ranks
    of a torchrun/srun `world` share every sub-run's batches; rank 0 writes the study report (None elsewhere)."""
    from klgap.job import engine

    out = Path(out)
    if layers == "all":
        from klgap.plan.resolve import resolve

        plan = resolve(dataclasses.replace(base, site=sites[0], layer=0, sae=sae_for(base.sae, sites[0], 0)))
        layers = list(range(engine.load_model(base.model, plan.device, plan.dtype, plan.placement).n_layers))
    configs, folders = [], []
    if checkpoints is not None:
        from klgap.job.checkpoint_study import checkpoint_runs
        from klgap.plan.resolve import resolve

        configs, folders = checkpoint_runs(base, [(s, v) for s in sites for v in layers], checkpoints, out)
        configs = [resolve(config) for config in configs]  # every checkpoint checked before anything loads
    for site in sites if checkpoints is None else []:
        for layer in layers:
            configs.append(dataclasses.replace(base, site=site, layer=layer, sae=sae_for(base.sae, site, layer)))
            folders.append(out / f"{site}_L{layer:02d}")
    if base.mode == "all_tokens" and base.fast and len(configs) > 1:
        engine.run_shared(configs, folders, overwrite=overwrite, progress=progress, shard=shard, world=world)
    else:
        for config, folder in zip(configs, folders, strict=True):
            engine.run(config, folder, overwrite=overwrite, progress=progress, shard=shard, world=world)
    if shard is not None or not world.leader:
        return None
    return write_study(base, folders, out, over_training=checkpoints is not None)


def write_study(base: RunConfig, folders: list[Path], out: Path, over_training: bool = False) -> StudyReport:
    """Build OUT/report.json of a study from its sub-runs' report.json files (no model needed)."""
    study = build_study(base, [load_report(folder) for folder in folders], folders, out, over_training)
    atomic_write_json(out / "report.json", as_json(study))
    return study


def build_study(base: RunConfig, reports: list[Report], folders: list[Path], out: Path,
                over_training: bool = False) -> StudyReport:
    """The study report over its sub-runs' reports: their summaries, Holm within each family across the study's
    sites/layers (klgap.report.holm), the gap correlations between sub-runs, and with `over_training` (its sub-runs
    are an SAE's checkpoints) the over-training section. The sub-reports are left unchanged."""
    runs = [StudyRun(**{k: getattr(report, k) for k in report.model_fields_set & set(SiteSummary.model_fields)},
                     path=str(folder.relative_to(out))).model_copy(deep=True)
            for report, folder in zip(reports, folders, strict=True)]
    apply_holm([run.comparisons for run in runs])
    extra = {}
    if over_training:
        from klgap.job.checkpoint_study import over_training as section

        extra["over_training"] = section(runs, folders, base.seed)
    return StudyReport(
        schema_version=SCHEMA_VERSION,
        kind="study",
        model=reports[0].model,
        mode=reports[0].mode,
        runs=runs,
        gap_correlation_between_runs=gap_correlations_between(folders, [run.path for run in runs]),
        config={**base.to_dict(), "layer": [run.layer for run in runs], "site": [run.site for run in runs]},
        provenance=provenance(),
        **extra,
    )


def _finite(value: float | None) -> float | None:
    """NaN and infinities as None, as report.json saves them."""
    return value if value is not None and math.isfinite(value) else None


def gap_correlations_between(folders: list[Path], labels: list[str]) -> list[RunPairCorrelation]:
    """Spearman ρ of the per-token gap KL(sae) − KL(baseline) between every pair of sub-runs, read a part at a
    time from each sub-run's parts (klgap.report.aggregate.token_gaps), paired on (context, position)."""
    from klgap.report.aggregate import token_gaps
    from klgap.job.folder import RunDir

    gaps = {}
    for folder, label in zip(folders, labels, strict=True):
        gap = token_gaps(RunDir(folder).finished_parts()[0], BASELINE)
        if gap is not None:
            gaps[label] = gap
    out = []
    names = list(gaps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = pd.concat([gaps[a].rename("a"), gaps[b].rename("b")], axis=1, join="inner").dropna()
            if len(pair) < 3:
                continue
            found = stats.spearman(pair["a"].to_numpy(), pair["b"].to_numpy())
            out.append(RunPairCorrelation(a=a, b=b, rho=_finite(float(found["rho"])),
                                          p_value=_finite(float(found["p_value"])), n=int(found["n"])))
    return out
