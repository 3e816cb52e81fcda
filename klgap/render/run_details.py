"""The details of a run's page below its finding: the SAE against each baseline (KL ratio, ΔCE, Wilcoxon with its
Holm correction), every intervention's KL and ΔCE, sae_lens's scores, the SAE's quality, the tokens with the
largest gap, and the single-token and many-samples sections (klgap/render/pages.py puts them in order).
"""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig, fmt_fixed, fmt_p, fmt_p_holm, interval_holds
from klgap.report.schema import Comparison, InterventionStats, MeanCI, RatioCI, Report
from klgap.report.sweep import is_sweep_point
from klgap.render.study_page import score_texts

N_TOP_ROWS = 10


def _ci(ratio: RatioCI) -> str:
    return fmt_ci(ratio.ratio, ratio.ci_low, ratio.ci_high)


def ce_delta_difference_text(comparison: Comparison, sae: InterventionStats | None,
                             baseline: InterventionStats | None) -> str:
    """Mean ΔCE(sae) − mean ΔCE(baseline) in nats with its paired context-bootstrap interval; reports without it
    (before 0.3.0) give the difference of the two means alone."""
    diff = comparison.ce_delta_difference
    if diff is not None:
        return fmt_ci_sig(diff.mean, diff.ci_low, diff.ci_high)
    if sae is None or baseline is None or sae.ce_delta_mean is None or baseline.ce_delta_mean is None:
        return DASH
    return fmt(sae.ce_delta_mean - baseline.ce_delta_mean, 3)


def ce_delta_ratio_text(comparison: Comparison) -> str:
    """The ΔCE ratio sae/baseline, only where the baseline's mean ΔCE (its denominator) has an interval that
    excludes 0 and the ratio's interval holds the ratio; otherwise '—'."""
    denominator, ratio = comparison.ce_delta_baseline, comparison.ce_delta_ratio
    if denominator is None or denominator.ci_low is None or denominator.ci_high is None:
        return DASH
    if denominator.ci_low <= 0 <= denominator.ci_high:
        return DASH
    if not interval_holds(ratio.ratio, ratio.ci_low, ratio.ci_high):
        return DASH
    return _ci(ratio)


def _p_with_holm(comparison: Comparison) -> str:
    """'3.81e-06 (Holm 4.20e-05)': the Holm-corrected p where its family holds more than this test."""
    test = comparison.wilcoxon_kl
    return fmt_p_holm(test.p_value, test.p_holm, test.holm_family_size)


def _comparisons(report: Report) -> list[Block]:
    if not report.comparisons:
        return []
    sae = report.interventions.get("sae")
    rows = [[name, _ci(comp.kl_ratio), ce_delta_difference_text(comp, sae, report.interventions.get(name)),
             ce_delta_ratio_text(comp), _p_with_holm(comp), fmt_fixed(comp.wilcoxon_kl.effect_size),
             fmt(comp.wilcoxon_kl.n_contexts)]
            for name, comp in report.comparisons.items() if not is_sweep_point(name)]  # sweeps: their own section
    return [
        Heading(2, "SAE against each baseline"),
        Table(["baseline", "KL ratio sae/baseline [95% CI]", "ΔCE sae − baseline [95% CI], nats", "ΔCE ratio [95% CI]",
               "Wilcoxon p (Holm)", "effect size (rank-biserial)", "contexts"], rows),
        Para("ΔCE is the change in next-token cross-entropy caused by the patch. Its difference pairs the SAE and "
             "the baseline on the same contexts (interval: bootstrap over contexts). The ΔCE ratio is shown only "
             "where the baseline's mean ΔCE has a 95% interval that excludes 0: a ratio over a denominator that may "
             "be 0 says nothing."),
    ]


def clean_ce_text(ce_clean: MeanCI) -> str:
    """'3.214 [3.102, 3.330]': the clean CE with its interval."""
    return fmt_ci(ce_clean.mean, ce_clean.ci_low, ce_clean.ci_high)


def _sae_lens_scores(report: Report) -> list[Block]:
    scores = report.sae_lens_scores
    if scores is None:
        return []
    blocks: list[Block] = [
        Heading(2, "sae_lens scores"),
        Para("sae_lens's normalised scores against zero ablation, from this run's means, computed as "
             "sae_lens.evals.get_recons_loss computes them: kl_div_score = (KL_zero − KL_sae) / KL_zero, "
             "ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean); 1 is a perfect reconstruction, 0 no "
             "better than zero ablation. zero ablation replaces every position (BOS and masked tokens too), the SAE "
             f"only the tokens kept (--mask-special {report.config.get('mask_special', 'first')}); both are "
             "measured on the kept tokens. Intervals: bootstrap over contexts."),
        Table(["kl_div_score", "ce_loss_score"], [list(score_texts(scores))]),
    ]
    if report.ce_clean is not None:
        blocks += [Table(["CE clean [95% CI]", "CE with the SAE", "CE with zero ablation"],
                         [[clean_ce_text(report.ce_clean), fmt(scores.ce_loss_with_sae), fmt(scores.ce_loss_with_ablation)]]),
                   Para("CE: the mean next-token cross-entropy in nats per measured token; with the SAE and with zero "
                        "ablation it is the clean CE plus that intervention's mean ΔCE, so ce_loss_score = "
                        "(CE_zero − CE_sae) / (CE_zero − CE_clean).")]
    if scores.ce_loss_score_withheld:
        blocks.append(Para(f"ce_loss_score is withheld: {scores.ce_loss_score_withheld}; a score over a "
                           "denominator that may be 0 says nothing."))
    return blocks


def _interventions(report: Report) -> list[Block]:
    rows = [[name, fmt(s.n_tokens), fmt(s.n_nonfinite), fmt(s.kl_mean), fmt(s.kl_median), fmt(s.kl_p999),
             fmt(s.ce_delta_mean), fmt(s.ce_delta_median), fmt(s.ce_delta_p999)]
            for name, s in report.interventions.items()]
    blocks: list[Block] = [
        Heading(2, "Interventions"),
        Table(["intervention", "tokens", "non-finite", "KL mean", "KL median", "KL p99.9", "ΔCE mean", "ΔCE median",
               "ΔCE p99.9"], rows),
    ]
    if report.ce_clean is not None:
        blocks.append(Para(f"Clean CE (no patch): {clean_ce_text(report.ce_clean)} nats per measured token, over "
                           f"{report.ce_clean.n_contexts:,} contexts (interval: bootstrap over contexts); ΔCE is each "
                           "intervention's change from it."))
    defined = {name: text for name, text in report.definitions.items() if name in report.interventions}
    if defined:
        blocks += [Para("What each intervention puts in place of x (its plugin's definition):"),
                   Bullets([f"{name}: {text}" for name, text in defined.items()])]
    return blocks


def _sae(report: Report) -> list[Block]:
    sae = report.sae
    items = [f"source: {sae.source}", f"hook: {sae.hook_name or DASH}", f"architecture: {sae.architecture}",
             f"d_in: {fmt(sae.d_in)}, d_sae: {fmt(sae.d_sae)}"]
    metrics = report.sae_metrics.model_dump()
    return [Heading(2, "SAE"), Bullets(items), Table(["metric", "value"], [[k, fmt(v)] for k, v in metrics.items()]),
            Para(METRIC_DEFINITIONS)]


#: the definitions under the SAE's metrics (klgap.report.schema.SAEMetrics holds each with its source)
METRIC_DEFINITIONS = (
    "Definitions, each as its source computes it (x centred like the SAE's input, x̄ the mean over the run's tokens): "
    "explained_variance = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², sae_lens's current form (SAELens #659/#665); "
    "explained_variance_legacy = the mean over tokens of 1 − ‖x − x̂‖² / ‖x − x̄_batch‖², sae_lens's legacy form "
    "(SAELens #443), which depends on --batch-size; fvu = Σ‖x − x̂‖² / Σ‖x − x̄‖², sparsify's fraction of variance "
    "unexplained (= 1 − explained_variance); mean_offset_share = ‖x̄‖² / mean ‖x‖²; top_pc_share = the first "
    "principal component's share of the variance around each batch's mean; explained_variance_top_pc_removed and "
    "explained_variance_top_pcs_removed = 1 − Σ‖P⊥(x − x̂)‖² / Σ‖P⊥(x − x̄_batch)‖², P⊥ the projection off each "
    "batch's first principal component, or off its top k (the fewest explaining half its variance; "
    "top_pcs_removed_min/max give k over the batches; batches of ≥ 256 measured tokens only). Every KL on this page is KL(P_clean || P_patched) = "
    "Σ_v P_clean(v) (log P_clean(v) − log P_patched(v)), per next-token prediction, as sae_lens computes it.")


def _gap(report: Report) -> list[Block]:
    gap = report.gap
    if gap is None:
        return []
    blocks: list[Block] = [
        Heading(2, f"Per-token gap KL(sae) − KL({gap.baseline})"),
        Bullets([f"mean gap: {fmt(gap.gap_mean)}",
                 f"fraction of tokens with a positive gap: {fmt_fixed(gap.frac_tokens_gap_positive)}"]),
    ]
    if gap.spearman:
        blocks += [Para("Spearman correlation of the gap with per-token quantities:"),
                   Table(["with", "rho", "p", "n"], [[k, fmt_fixed(c.rho), fmt_p(c.p_value), fmt(c.n)]
                                                     for k, c in gap.spearman.items()])]
    top = gap.top_tokens
    if top:
        blocks += [Para(f"Tokens with the largest mean gap (first {min(len(top), N_TOP_ROWS)}):"),
                   Table(["token", "id", "mean gap", "count"],
                         [[repr(t.token) if t.token is not None else DASH, fmt(t.token_id), fmt(t.mean_gap),
                           fmt(t.count)] for t in top[:N_TOP_ROWS]])]
    return blocks


def _single_token(report: Report) -> list[Block]:
    single = report.single_token
    if single is None:
        return []
    by_offset = single.kl_by_offset
    names = list(by_offset)
    offsets = sorted({int(o) for curve in by_offset.values() for o in curve})
    rows = [[f"t+{o}", *[fmt(by_offset[n].get(str(o))) for n in names]] for o in offsets]
    return [
        Heading(2, f"Single token: patched at t = {single.position}, measured to t+{single.k}"),
        Para("Mean KL at each offset after the patched token, per intervention."),
        Table(["offset", *names], rows),
    ]


def _many_samples(report: Report) -> list[Block]:
    many = report.many_samples
    if many is None:
        return []
    position = report.position
    items = [
        f"{fmt(many.n_draws)} draws of {many.sample_intervention} per context"
        + (f" at position {position}" if position is not None else ""),
        f"z of the SAE's KL against the draws: mean {fmt_fixed(many.z_mean, 2)}, median {fmt_fixed(many.z_median, 2)}",
        f"fraction of contexts with z > 2: {fmt_fixed(many.frac_z_above_2)}",
        f"mean percentile of the SAE's KL among the draws: {fmt(many.percentile_mean)}",
    ]
    rows = [[fmt(c.context), fmt(c.sae_kl), fmt(c.draw_mean), fmt(c.draw_std), fmt_fixed(c.z, 2), fmt(c.percentile)]
            for c in many.per_context[:N_TOP_ROWS]]
    blocks: list[Block] = [Heading(2, "Many samples"), Bullets(items)]
    if rows:
        blocks += [Para(f"First {len(rows)} of {len(many.per_context)} contexts:"),
                   Table(["context", "sae KL", "draws mean", "draws sd", "z", "percentile"], rows)]
    return blocks


def detail_blocks(report: Report) -> list[Block]:
    """A run's details, in page order."""
    return [*_comparisons(report), *_interventions(report), *_sae_lens_scores(report), *_sae(report),
            *_single_token(report), *_many_samples(report), *_gap(report)]


__all__ = ["ce_delta_difference_text", "ce_delta_ratio_text", "detail_blocks"]
