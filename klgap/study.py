"""Several sites and layers in one command: one sub-run per (site, layer), one study report over them.

`--layer 3,10,17` (or `all`, or `0-5`) and `--site mlp_out,attn_out` make the cross product. Each
sub-run is an ordinary run in ``OUT/<site>_L<layer>/`` (its own report.json, tokens.parquet, resume);
``OUT/report.json`` is the study report: every sub-run's summary, Wilcoxon p-values Holm-corrected
across all of them, and the Spearman correlation of the per-token gap between every pair of sub-runs
(the same tokens are measured everywhere: same dataset, seed and context length).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pandas as pd
from scipy import stats as sps

from klgap import stats
from klgap.config import RunConfig
from klgap.errors import KlgapError
from klgap.provenance import provenance
from klgap.rundir import atomic_write_json
from klgap.schema import (
    BASELINE, SCHEMA_VERSION, Report, RunPairCorrelation, SiteSummary, StudyReport, StudyRun, as_json, validate_report,
)
from klgap.sites import SITES, check_site


def parse_layers(text: str | int | list, n_layers: int | None = None) -> list[int] | str:
    """`"3"`, `"3,10,17"`, `"0-5"`, `"all"` -> list of layers (or "all" when n_layers is not known yet)."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [int(v) for v in text]
    text = str(text).strip()
    if text == "all":
        return list(range(n_layers)) if n_layers is not None else "all"
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise KlgapError(f"--layer {text!r}: {part!r} is not a layer; write 3, 3,10,17, 0-5 or all")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise KlgapError(f"--layer {text!r}: range {part!r} runs backwards")
        layers.extend(range(low, high + 1))
    if not layers:
        raise KlgapError("--layer is empty; write 3, 3,10,17, 0-5 or all")
    return sorted(dict.fromkeys(layers))


def parse_sites(text: str) -> list[str]:
    sites = [check_site(s.strip()) for s in str(text).split(",") if s.strip()]
    if not sites:
        raise KlgapError(f"--site is empty; valid: {', '.join(SITES)}")
    return list(dict.fromkeys(sites))


def sae_for(template: str | None, site: str, layer: int) -> str | None:
    """An SAE spec for one sub-run: `{layer}` and `{site}` in the template are filled in."""
    if template is None:
        return None
    if "{layer}" not in template and "{site}" not in template:
        raise KlgapError(
            f"--sae {template!r} names one SAE but several sites/layers were asked for; put {{layer}} (and "
            "{site}) in it, e.g. sae_lens:gpt2-small-res-jb/blocks.{layer}.hook_resid_pre, or leave --sae out"
        )
    return template.replace("{layer}", str(layer)).replace("{site}", site)


def run_study(base: RunConfig, sites: list[str], layers: list[int] | str, out: str | Path,
              overwrite: bool = False, progress: bool = True, shard: tuple[int, int] | None = None) -> StudyReport | None:
    """Run every (site, layer) into its own folder, then write the study report.

    With ``shard=(i, n)`` every sub-run measures only its share of batches and no report is written."""
    from klgap import engine

    out = Path(out)
    if layers == "all":
        model = engine.load_model(base.model, engine.pick_device(base.device), __import__("torch").__dict__[base.dtype])
        layers = list(range(model.n_layers))
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
    study = build_study(base, [validate_report(r) for r in reports], folders, out)  # engine.run: a dict for now
    atomic_write_json(out / "report.json", as_json(study))
    return study


def build_study(base: RunConfig, reports: list[Report], folders: list[Path], out: Path) -> StudyReport:
    """The study report over its sub-runs' reports: their summaries, Holm across every (run, baseline)
    Wilcoxon test of the study, the gap correlations between sub-runs. The sub-reports are left unchanged."""
    runs = [StudyRun(**{k: getattr(report, k) for k in report.model_fields_set & set(SiteSummary.model_fields)},
                     path=str(folder.relative_to(out))).model_copy(deep=True)
            for report, folder in zip(reports, folders, strict=True)]
    tests = [run.comparisons[name].wilcoxon_kl for run in runs for name in run.comparisons]
    for test, p in zip(tests, stats.holm([test.p_value for test in tests]), strict=True):
        test.p_holm = _finite(p)
    return StudyReport(
        schema_version=SCHEMA_VERSION,
        kind="study",
        model=reports[0].model,
        mode=reports[0].mode,
        runs=runs,
        gap_correlation_between_runs=gap_correlations_between(folders, [run.path for run in runs]),
        config={**base.to_dict(), "layer": [run.layer for run in runs], "site": [run.site for run in runs]},
        provenance=provenance(),
    )


def _finite(value: float | None) -> float | None:
    """NaN and infinities as None, as report.json saves them."""
    return value if value is not None and math.isfinite(value) else None


def gap_correlations_between(folders: list[Path], labels: list[str]) -> list[RunPairCorrelation]:
    """Spearman ρ of the per-token gap KL(sae) − KL(baseline) between every pair of sub-runs."""
    gaps = {}
    for folder, label in zip(folders, labels, strict=True):
        frame = pd.read_parquet(folder / "tokens.parquet", columns=["context", "position", "intervention", "draw", "kl"])
        if {"sae", BASELINE} <= set(frame["intervention"].unique()):
            gaps[label] = stats.token_gap(frame, BASELINE).set_index(["context", "position"])["gap"]
    out = []
    names = list(gaps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = pd.concat([gaps[a].rename("a"), gaps[b].rename("b")], axis=1, join="inner").dropna()
            if len(pair) < 3:
                continue
            result = sps.spearmanr(pair["a"], pair["b"])
            out.append(RunPairCorrelation(a=a, b=b, rho=_finite(float(result.statistic)),
                                          p_value=_finite(float(result.pvalue)), n=int(len(pair))))
    return out
