"""`klgap export RUN --format saebench`: a run's numbers as the core-eval result file SAEBench writes and reads.

The schema is SAEBench's ``CoreEvalOutput`` (sae_bench/evals/core/eval_output.py, release 0.6.0, commit
8042bb3828c6340da8d12062324e92b2077c571c; its JSON Schema is committed beside this module as
``saebench_core.schema.json``). Every metric category SAEBench defines is required there and every metric is a
number, so a value klgap did not measure (SAEBench's mse, L1, per-token L2 ratio, reconstruction bias and
feature-density metrics; the absolute CE losses of a run whose parts predate klgap's clean CE, or that did not
measure `zero` for ce_loss_with_ablation / ce_loss_with_sae) is written as -1, the stand-in
SAEBench itself writes for a value it could not compute (core/main.py ``replace_nans_with_negative_one``), and is
listed by name in ``eval_result_unstructured.klgap.not_measured``. klgap's KL gap (KL(sae)/KL(epsilon_random) with its
95% context-bootstrap interval and Wilcoxon p, and the per-baseline panel) goes in ``eval_result_unstructured.klgap``
and, flat, in an extra ``eval_result_metrics.kl_gap`` category (the JSON Schema allows extra categories; SAEBench's
pydantic classes ignore it).

As SAEBench does for several SAEs, a study writes one file per SAE (site/layer) into one folder, each named as
SAEBench names it: ``{release}_{sae_id}_eval_results.json`` with '/' replaced by '_'.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import klgap
from klgap.errors import KlgapError
from klgap.report.panel import baseline_panel, opening_sentence
from klgap.report.read import load_report
from klgap.report.schema import Report, SiteSummary, StudyReport
from klgap.report.summary import summary_row

FORMATS = ("saebench",)
#: SAEBench's core-eval JSON Schema, copied from its source (see the module docstring for the commit)
SCHEMA_FILE = Path(__file__).with_name("saebench_core.schema.json")
SAEBENCH_VERSION = "0.6.0"
#: SAEBench's own stand-in for a metric it could not compute (core/main.py: NaN -> -1)
NOT_MEASURED = -1


@dataclass(frozen=True)
class Exported:
    """One file written: where, and the document it holds."""

    path: Path
    document: dict[str, Any]


def _value(value: float | None, name: str, missing: list[str]) -> float:
    """A metric as SAEBench requires it (a finite number); -1 and its name in `missing` when klgap has none."""
    if value is None or not math.isfinite(value):
        missing.append(name)
        return NOT_MEASURED
    return float(value)


def release_and_id(run: SiteSummary, model: str) -> tuple[str | None, str | None, str, str]:
    """(sae_lens release, sae_lens id) when the SAE is a sae_lens pretrained one (else None, None), and the
    (release, id) its file is named by: a local SAE's are ``klgap_{model}`` and its hook name."""
    release, sae_id = run.sae.info.get("release"), run.sae.info.get("sae_id")
    if isinstance(release, str) and isinstance(sae_id, str):
        return release, sae_id, release, sae_id
    return None, None, f"klgap_{model}", run.hook_name


def file_name(release: str, sae_id: str) -> str:
    """SAEBench's result file name (sae_bench_utils/general_utils.get_results_filepath)."""
    return f"{release}_{sae_id}_eval_results.json".replace("/", "_")


def eval_config(facts: Report) -> dict[str, Any]:
    """SAEBench's CoreEvalConfig with what this run measured: its model, dtype, contexts, dataset and masking."""
    batch = int(facts.config.get("batch_size") or 1)
    batches = max(1, math.ceil(facts.n_contexts / batch))
    masked = facts.masked_tokens is not None and facts.masked_tokens != "none"
    return {
        "model_name": facts.model, "llm_dtype": facts.dtype, "batch_size_prompts": batch,
        "n_eval_reconstruction_batches": batches, "n_eval_sparsity_variance_batches": batches,
        "dataset": facts.dataset, "context_size": facts.context_len, "compute_kl": True,
        "compute_ce_loss": "zero" in facts.interventions, "compute_l2_norms": True, "compute_sparsity_metrics": True,
        "compute_variance_metrics": True, "compute_featurewise_density_statistics": False,
        "compute_featurewise_weight_based_metrics": False, "exclude_special_tokens_from_reconstruction": masked,
        "verbose": False,
    }


def core_metrics(run: SiteSummary, missing: list[str]) -> dict[str, dict[str, float]]:
    """SAEBench's seven core metric categories from a run's summary (-1 and a name in `missing` where unknown)."""
    sae, zero, scores, geo = run.interventions.get("sae"), run.interventions.get("zero"), run.sae_lens_scores, run.sae_metrics

    def v(category: str, name: str, value: float | None) -> float:
        return _value(value, f"{category}.{name}", missing)

    mb, mp, rq, sh, sp, ts = ("model_behavior_preservation", "model_performance_preservation",
                              "reconstruction_quality", "shrinkage", "sparsity", "token_stats")
    return {
        mb: {"kl_div_score": v(mb, "kl_div_score", scores.kl_div_score if scores else None),
             "kl_div_with_ablation": v(mb, "kl_div_with_ablation", zero.kl_mean if zero else None),
             "kl_div_with_sae": v(mb, "kl_div_with_sae", sae.kl_mean if sae else None)},
        mp: {"ce_loss_score": v(mp, "ce_loss_score", scores.ce_loss_score if scores else None),
             # absolute CE, nats per measured token: the clean CE and clean CE + mean ΔCE (klgap/report/build.py)
             "ce_loss_with_ablation": v(mp, "ce_loss_with_ablation", scores.ce_loss_with_ablation if scores else None),
             "ce_loss_with_sae": v(mp, "ce_loss_with_sae", scores.ce_loss_with_sae if scores else None),
             "ce_loss_without_sae": v(mp, "ce_loss_without_sae", run.ce_clean.mean if run.ce_clean else None)},
        rq: {"explained_variance": v(rq, "explained_variance", geo.explained_variance),
             "explained_variance_legacy": v(rq, "explained_variance_legacy", geo.explained_variance_legacy),
             "mse": v(rq, "mse", None),
             "cossim": v(rq, "cossim", geo.cos_mean)},
        sh: {"l2_norm_in": v(sh, "l2_norm_in", geo.x_norm_mean),
             "l2_norm_out": v(sh, "l2_norm_out", geo.x_hat_norm_mean),
             "l2_ratio": v(sh, "l2_ratio", None),  # SAEBench: the mean of per-token ratios, not klgap's ratio of means
             "relative_reconstruction_bias": v(sh, "relative_reconstruction_bias", None)},
        sp: {"l0": v(sp, "l0", geo.l0_mean), "l1": v(sp, "l1", None)},
        ts: {"total_tokens_eval_reconstruction": run.n_tokens, "total_tokens_eval_sparsity_variance": run.n_tokens},
        "misc_metrics": {name: v("misc_metrics", name, None) for name in (
            "freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
            "normalized_freq_over_10_percent", "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
            "frac_alive")},
    }


def kl_gap_metrics(run: SiteSummary, model: str, mode: str) -> dict[str, float | None]:
    """The KL gap as flat metrics: KL(sae)/KL(epsilon_random), its interval and Wilcoxon p (None: not measured)."""
    row = summary_row(run, model, mode)
    return {"kl_ratio_sae_over_epsilon_random": row.ratio, "kl_ratio_ci_low": row.ratio_ci_low,
            "kl_ratio_ci_high": row.ratio_ci_high, "wilcoxon_p": row.p_value, "wilcoxon_p_holm": row.p_holm,
            "kl_sae": row.kl_sae, "kl_epsilon_random": row.kl_baseline}


def klgap_block(run: SiteSummary, facts: Report, source: Path, missing: list[str]) -> dict[str, Any]:
    """What klgap adds (eval_result_unstructured.klgap): the KL gap, the baseline panel, ΔCE, notes, provenance."""
    panel = baseline_panel(run, facts.model, facts.mode)
    scores = run.sae_lens_scores
    notes = [f"Written by klgap {klgap.__version__} from {source} (measured {facts.provenance.created_at}), not by "
             f"SAEBench; schema of sae_bench {SAEBENCH_VERSION}.",
             f"-1 marks a metric klgap did not measure (SAEBench's own stand-in for NaN): {', '.join(missing)}.",
             "kl_div_score / ce_loss_score are sae_lens's (zero ablation at every position), over klgap's measured "
             "tokens; KL is KL(P_clean || P_patched) in nats per token; CE losses are mean next-token cross-entropies "
             "in nats per measured token (ce_loss_without_sae the clean run's, the others clean CE + mean ΔCE).",
             "explained_variance is klgap's pooled 1 - sum||x - x_hat||^2 / sum||x - mean x||^2 over the measured "
             "tokens; cossim is the mean per-token cos(x, x_hat); l0 the mean number of active features."]
    if scores is not None and scores.ce_loss_score_withheld:
        notes.append(f"ce_loss_score withheld: {scores.ce_loss_score_withheld}")
    notes += [note.text for note in run.quality_notes]
    return {
        "finding": opening_sentence(run, facts.model, facts.mode),
        "kl_gap": kl_gap_metrics(run, facts.model, facts.mode),
        "panel": [{"baseline": r.baseline, "label": r.label, "ratio": r.ratio, "ci_low": r.ci_low, "ci_high": r.ci_high,
                   "p_value": r.p_value, "p_holm": r.p_holm, "verdict": r.verdict} for r in (panel.rows if panel else ())],
        "kl_div_score_ci": list(scores.kl_div_score_ci) if scores and scores.kl_div_score_ci else None,
        "ce_loss_score_ci": list(scores.ce_loss_score_ci) if scores and scores.ce_loss_score_ci else None,
        "ce_delta_mean": {name: stats.ce_delta_mean for name, stats in run.interventions.items()},
        "ce_clean_ci": [run.ce_clean.ci_low, run.ce_clean.ci_high] if run.ce_clean else None,
        "kl_mean": {name: stats.kl_mean for name, stats in run.interventions.items()},
        "n_contexts": run.n_contexts, "mode": facts.mode, "site": run.site, "layer": run.layer,
        "hook_name": run.hook_name, "sae_source": run.sae.source, "masked_tokens": facts.masked_tokens,
        "run_folder": str(source), "klgap_version": klgap.__version__, "not_measured": list(missing), "notes": notes,
    }


def saebench_document(run: SiteSummary, facts: Report, source: Path) -> dict[str, Any]:
    """The CoreEvalOutput document of one site/layer: `run` its numbers (a run report or a study's row, whose
    Holm correction spans the study), `facts` the run report it was measured by, `source` its folder."""
    missing: list[str] = []
    metrics = core_metrics(run, missing)
    unstructured = klgap_block(run, facts, source, missing)
    metrics["kl_gap"] = {k: _value(v, f"kl_gap.{k}", []) for k, v in unstructured["kl_gap"].items()}
    lens_release, lens_id, _, _ = release_and_id(run, facts.model)
    created = datetime.fromisoformat(facts.provenance.created_at)
    meta = run.sae.info.get("metadata")
    return {
        "eval_type_id": "core",
        "eval_config": eval_config(facts),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(created.timestamp() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [],
        "sae_bench_commit_hash": f"none: written by klgap {klgap.__version__}",
        "sae_lens_id": lens_id,
        "sae_lens_release_id": lens_release,
        "sae_lens_version": facts.provenance.packages.get("sae-lens"),
        "sae_cfg_dict": {"architecture": run.sae.architecture, "d_in": run.sae.d_in, "d_sae": run.sae.d_sae,
                         "hook_name": run.sae.hook_name or run.hook_name, "hook_layer": run.layer,
                         "model_name": facts.model, "context_size": facts.context_len,
                         **(meta if isinstance(meta, dict) else {})},
        "eval_result_unstructured": {"klgap": unstructured},
    }


def export_run(folder: str | Path, fmt: str = "saebench", out: str | Path | None = None) -> list[Exported]:
    """Write a run or study folder's SAEBench core-eval file(s). `out`: a ``.json`` file (a run only) or a folder
    (default ``RUN/saebench``), into which each SAE's file goes under SAEBench's name. KlgapError on a bad format, a
    folder that is not a run, or a ``.json`` out for a study."""
    if fmt not in FORMATS:
        raise KlgapError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    folder = Path(folder)
    if not (folder / "report.json").is_file():
        raise KlgapError(f"{str(folder)!r} is not a run or study folder (no report.json); give a folder written by "
                         "klgap replicate or klgap curve")
    report = load_report(folder)
    if isinstance(report, StudyReport):
        pairs = [(run, load_report(folder / run.path), folder / run.path) for run in report.runs]
    else:
        pairs = [(report, report, folder)]
    single = out is not None and str(out).endswith(".json")
    if single and len(pairs) > 1:
        raise KlgapError(f"--out {out} is one file, but {folder} is a study of {len(pairs)} SAEs; give a folder "
                         "(SAEBench writes one file per SAE)")
    target = Path(out) if out is not None else folder / "saebench"
    written = []
    for run, facts, source in pairs:
        if not isinstance(facts, Report):
            raise KlgapError(f"{source} holds no run report")
        document = saebench_document(run, facts, source)
        _, _, release, sae_id = release_and_id(run, facts.model)
        path = target if single else target / file_name(release, sae_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        written.append(Exported(path, document))
    return written


__all__ = ["FORMATS", "SCHEMA_FILE", "Exported", "export_run", "saebench_document"]
