"""Several sites and layers in one command: one sub-run per (site, layer), one study report over them.

`--layer 3,10,17` (or `all`, or `0-5`) and `--site mlp_out,attn_out` make the cross product. Each
sub-run is an ordinary run in ``OUT/<site>_L<layer>/`` (its own report.json, tokens.parquet, resume);
``OUT/report.json`` is the study report: every sub-run's summary, Wilcoxon p-values Holm-corrected
across all of them, and the Spearman correlation of the per-token gap between every pair of sub-runs
(the same tokens are measured everywhere: same dataset, seed and context length).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats as sps

from klgap import stats
from klgap.config import RunConfig
from klgap.errors import KlgapError
from klgap.provenance import provenance
from klgap.rundir import atomic_write_json
from klgap.schema import SCHEMA_VERSION, validate_report
from klgap.grid import parse_layers, parse_sites, sae_for  # noqa: F401  (re-exported: klgap.study.sae_for)

SUMMARY_KEYS = (
    "site", "layer", "hook_name", "sae", "n_tokens", "n_contexts", "interventions",
    "kl_ratio_sae_over_epsilon_random", "comparisons", "sae_metrics", "notes", "curve",
)


def run_study(base: RunConfig, sites: list[str], layers: list[int] | str, out: str | Path,
              overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """Run every (site, layer) into its own folder, then write the study report.

    With ``shard=(i, n)`` every sub-run measures only its share of batches and no report is written."""
    from klgap import engine

    out = Path(out)
    if layers == "all":
        from klgap.resolve import resolve

        plan = resolve(dataclasses.replace(base, site=sites[0], layer=0, sae=sae_for(base.sae, sites[0], 0)))
        layers = list(range(engine.load_model(base.model, plan.device, plan.dtype, plan.placement).n_layers))
    configs, folders = [], []
    for site in sites:
        for layer in layers:
            configs.append(dataclasses.replace(base, site=site, layer=layer, sae=sae_for(base.sae, site, layer)))
            folders.append(out / f"{site}_L{layer:02d}")
    if base.mode == "all_tokens" and base.fast and len(configs) > 1:
        reports = engine.run_shared(configs, folders, overwrite=overwrite, progress=progress, shard=shard)
    else:
        reports = [engine.run(c, f, overwrite=overwrite, progress=progress, shard=shard) for c, f in zip(configs, folders, strict=True)]
    if shard is not None:
        return None
    return write_study(base, folders, out)


def write_study(base: RunConfig, folders: list[Path], out: Path):
    """Build OUT/report.json of a study from its sub-runs' report.json files (no model needed)."""
    from klgap.schema import load_report

    reports = [load_report(folder) for folder in folders]
    reports = [r if isinstance(r, dict) else r.model_dump(mode="json") for r in reports]
    study = build_study(base, reports, folders, out)
    validated = validate_report(study, source="the study report just built")
    atomic_write_json(out / "report.json", study)
    return validated


def build_study(base: RunConfig, reports: list[dict[str, Any]], folders: list[Path], out: Path) -> dict[str, Any]:
    runs = []
    for report, folder in zip(reports, folders, strict=True):
        runs.append({**{k: report.get(k) for k in SUMMARY_KEYS}, "path": str(folder.relative_to(out))})
    # Holm across every (run, baseline) Wilcoxon test in the study
    tests = [(i, name) for i, run in enumerate(runs) for name in run["comparisons"]]
    adjusted = stats.holm([runs[i]["comparisons"][name]["wilcoxon_kl"]["p_value"] for i, name in tests])
    for (i, name), p in zip(tests, adjusted, strict=True):
        runs[i]["comparisons"][name]["wilcoxon_kl"]["p_holm"] = p
    from klgap.report import _clean

    return _clean({
        "schema_version": SCHEMA_VERSION,
        "kind": "study",
        "model": reports[0]["model"],
        "mode": reports[0]["mode"],
        "runs": runs,
        "gap_correlation_between_runs": gap_correlations_between(folders, [r["path"] for r in runs]),
        "config": {**base.to_dict(), "layer": [r["layer"] for r in runs], "site": [r["site"] for r in runs]},
        "provenance": provenance(),
    })


def gap_correlations_between(folders: list[Path], labels: list[str]) -> list[dict[str, Any]]:
    """Spearman ρ of the per-token gap KL(sae) − KL(epsilon_random) between every pair of sub-runs."""
    gaps = {}
    for folder, label in zip(folders, labels, strict=True):
        frame = pd.read_parquet(folder / "tokens.parquet", columns=["context", "position", "intervention", "draw", "kl"])
        if {"sae", "epsilon_random"} <= set(frame["intervention"].unique()):
            gaps[label] = stats.token_gap(frame).set_index(["context", "position"])["gap"]
    out = []
    names = list(gaps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = pd.concat([gaps[a].rename("a"), gaps[b].rename("b")], axis=1, join="inner").dropna()
            if len(pair) < 3:
                continue
            result = sps.spearmanr(pair["a"], pair["b"])
            out.append({"a": a, "b": b, "rho": float(result.statistic), "p_value": float(result.pvalue), "n": int(len(pair))})
    return out
