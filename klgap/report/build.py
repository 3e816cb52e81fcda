"""report.json: a run's numbers, configuration and provenance, built from its folder alone (run.json + parts),
with every section a plugin registers that the run has (klgap/report/sections.py).

Data first; pictures come later (klgap/render/pages.py). Nothing here loads a model or an SAE.
"""

from __future__ import annotations

import math
from typing import Any

from klgap.job.folder import RunDir
from klgap.job.record import RunRecord
from klgap.report.aggregate import context_sums, run_statistics
from klgap.report.numbers import plain
from klgap.report.quality import quality_of
from klgap.report.read import load_report
from klgap.report.schema import (
    BASELINE, SCHEMA_VERSION, Comparison, InterventionStats, MeanCI, QualityNote, RatioCI, Report, SaeLensScores,
    SAEMetrics,
    Sweep,
)
from klgap.report.sections import RunFiles, build_run_sections, report_model
from klgap.report.size_bins import size_bins
from klgap.report.sweep import build_sweep, is_sweep_point


def token_decoder(sides: list[dict[str, Any]]) -> Any:
    """``decode(token_id) -> text | None`` from the token texts the parts recorded (no tokenizer needed)."""
    texts: dict[str, str] = {}
    for side in sides:
        texts.update(side.get("token_text") or {})
    return lambda token_id: texts.get(str(int(token_id)))


def build_report(record: RunRecord, rundir: RunDir) -> Report:
    """The report of a run folder: a pure function of its run.json and parts (no model, no SAE), computed a part
    at a time (klgap.report.aggregate), so memory does not grow with the run."""
    paths, sides = rundir.finished_parts()
    found = run_statistics(paths, sides, names=record.names, mode=record.mode, seed=record.seed,
                           sample_name=record.sample_intervention, decode=token_decoder(sides))
    facts = record.model_dump(exclude={"kind", "interventions", "sample_intervention", "n_contexts", "n_batches",
                                       *(name for name in ("joint", "precision", "held_out") if getattr(record, name) is None)})
    report: dict[str, Any] = {
        **facts,
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "n_tokens": found.n_tokens,
        "n_contexts": found.n_contexts,
        "interventions": found.interventions,
        "kl_ratio_sae_over_epsilon_random": found.kl_ratio_sae_over_epsilon_random,
        "comparisons": found.comparisons,
        "sae_metrics": found.sae_metrics,
        "gap": found.gap,
        "curve": found.curve,
    }
    report["definitions"] = {ref.name: ref.definition for ref in record.interventions if ref.definition}
    baselines = declared_baselines(record)
    if baselines is not None:
        report["baselines"] = baselines
    if record.mode == "all_tokens" and record.joint is None:  # the ratio at matched ε/‖x‖
        bins = size_bins(paths, list(baselines or [BASELINE]), record.seed)
        if bins is not None:
            report["size_bins"] = bins
    if found.ce_clean is not None:
        report["ce_clean"] = found.ce_clean
    scores = sae_lens_scores(found.interventions, found.comparisons, found.ce_clean)
    if scores is not None:
        report["sae_lens_scores"] = scores
    report["quality_notes"] = quality_notes(record, rundir, found.sae_metrics, scores)
    if record.mode == "single_token":
        report["single_token"] = {"position": record.config["position"], "k": record.config["k"],
                                  "kl_by_offset": found.kl_by_offset}
    if record.mode == "many_samples":
        report["many_samples"] = found.many_samples
    sweep = _sweep(record, paths, found.interventions)
    if sweep is not None:
        report["sweep"] = sweep
    report.update(build_run_sections(RunFiles(record, rundir, paths, sides, found)))  # klgap/report/sections.py
    return report_model("run").model_validate(plain(_plain(report)))


def quality_notes(record: RunRecord, rundir: RunDir, metrics: SAEMetrics,
                  scores: SaeLensScores | None) -> list[QualityNote]:
    """The notes on the SAE's quality beside the verdict (klgap/report/quality.py); a joint run's are its sites',
    each named by its hook (read from the site's own report, built before this one)."""
    if record.joint is None:
        return quality_of(metrics, record.sae, scores).notes()
    return [note.model_copy(update={"text": f"{site.hook_name}: {note.text}"})
            for site in record.joint for note in load_report(rundir.root / site.path).quality_notes]


def declared_baselines(record: RunRecord) -> dict[str, str] | None:
    """The measured interventions their plugins declare baselines, by recorded name, with how a sentence names each
    (klgap.protocols.BaselineRole); None when run.json does not say (written before klgap recorded it)."""
    if not any("baseline" in ref.model_fields_set for ref in record.interventions):
        return None
    return {ref.name: ref.baseline for ref in record.interventions if ref.baseline is not None}


def _sweep(record: RunRecord, paths: list[Any], interventions: dict[str, InterventionStats]) -> Sweep | None:
    """The length-sweep section (klgap/report/sweep.py) when the run measured ``along`` points."""
    if record.mode == "many_samples" or not any(is_sweep_point(name) for name in record.names):
        return None
    per_context = context_sums(paths)
    return build_sweep(record.names, lambda name: per_context(name, "kl"), interventions, record.seed)


def sae_lens_scores(interventions: dict[str, InterventionStats], comparisons: dict[str, Comparison],
                    ce_clean: MeanCI | None = None) -> SaeLensScores | None:
    """sae_lens's kl_div_score and ce_loss_score from the mean KL and ΔCE of `sae` and `zero` (ratios of means
    over the measured tokens, as sae_lens.evals computes them), each with the interval of the run's sae/zero
    comparison (1 − its ratio's bootstrap interval over contexts); ce_loss_score withheld when the interval of
    zero's mean ΔCE (CE_zero − CE_clean) contains 0; with the run's clean CE (`ce_clean`), the absolute CE_sae and
    CE_zero (clean CE + mean ΔCE). None unless both were measured."""
    sae, zero = interventions.get("sae"), interventions.get("zero")
    if sae is None or zero is None:
        return None

    def score(ablated: float | None, reconstructed: float | None) -> float:
        if ablated is None or reconstructed is None or ablated == 0:
            return math.nan
        return (ablated - reconstructed) / ablated

    def interval(ratio: RatioCI) -> tuple[float, float] | None:
        low, high = 1 - ratio.ci_high, 1 - ratio.ci_low
        return (low, high) if math.isfinite(low) and math.isfinite(high) else None

    compared = comparisons.get("zero")
    kl = score(zero.kl_mean, sae.kl_mean)
    ce: float | None = score(zero.ce_delta_mean, sae.ce_delta_mean)
    withheld = None
    denominator = compared.ce_delta_baseline if compared is not None else None
    if denominator is not None and not (denominator.ci_low > 0 or denominator.ci_high < 0):
        withheld = (f"CE_zero − CE_clean = {denominator.mean:.4g}, 95% interval [{denominator.ci_low:.4g}, "
                    f"{denominator.ci_high:.4g}] over {denominator.n_contexts} contexts, contains 0")
        ce = None
    absolute: dict[str, float | None] = {}
    if ce_clean is not None:
        absolute = {"ce_loss_with_sae": absolute_ce(ce_clean, sae), "ce_loss_with_ablation": absolute_ce(ce_clean, zero)}
    return SaeLensScores(
        **absolute, kl_div_score=kl, ce_loss_score=ce, ce_loss_score_withheld=withheld,
        kl_div_score_ci=interval(compared.kl_ratio) if compared is not None else None,
        ce_loss_score_ci=interval(compared.ce_delta_ratio) if compared is not None and ce is not None else None,
        n_contexts=compared.kl_ratio.n_contexts if compared is not None else None)


def absolute_ce(ce_clean: MeanCI, patched: InterventionStats) -> float | None:
    """An intervention's mean next-token CE, nats per measured token: the clean CE plus its mean ΔCE (both over
    the run's measured tokens); None where either is unknown."""
    if ce_clean.mean is None or patched.ce_delta_mean is None:
        return None
    total = ce_clean.mean + patched.ce_delta_mean
    return total if math.isfinite(total) else None


def _plain(obj: Any) -> Any:
    """Pydantic sub-results as the dicts they would be written as (only the fields they were built with)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_unset=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
