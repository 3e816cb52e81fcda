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
from klgap.report.schema import BASELINE, SCHEMA_VERSION, InterventionStats, Report, SaeLensScores, Sweep
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
    baselines = declared_baselines(record)
    if baselines is not None:
        report["baselines"] = baselines
    if record.mode == "all_tokens" and record.joint is None:  # the ratio at matched ε/‖x‖
        bins = size_bins(paths, list(baselines or [BASELINE]), record.seed)
        if bins is not None:
            report["size_bins"] = bins
    scores = sae_lens_scores(found.interventions)
    if scores is not None:
        report["sae_lens_scores"] = scores
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


def _sweep(record: RunRecord, paths: list[Any], interventions: dict[str, InterventionStats]) -> Sweep | None:
    """The length-sweep section (klgap/report/sweep.py) when the run measured ``along`` points."""
    if record.mode == "many_samples" or not any(is_sweep_point(name) for name in record.names):
        return None
    per_context = context_sums(paths)
    return build_sweep(record.names, lambda name: per_context(name, "kl"), interventions, record.seed)


def sae_lens_scores(interventions: dict[str, InterventionStats]) -> SaeLensScores | None:
    """sae_lens's kl_div_score and ce_loss_score from the mean KL and ΔCE of `sae` and `zero` (ratios of means
    over the measured tokens, as sae_lens.evals computes them); None unless both were measured."""
    sae, zero = interventions.get("sae"), interventions.get("zero")
    if sae is None or zero is None:
        return None

    def score(ablated: float | None, reconstructed: float | None) -> float:
        if ablated is None or reconstructed is None or ablated == 0:
            return math.nan
        return (ablated - reconstructed) / ablated

    return SaeLensScores(kl_div_score=score(zero.kl_mean, sae.kl_mean),
                         ce_loss_score=score(zero.ce_delta_mean, sae.ce_delta_mean))


def _plain(obj: Any) -> Any:
    """Pydantic sub-results as the dicts they would be written as (only the fields they were built with)."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_unset=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj
