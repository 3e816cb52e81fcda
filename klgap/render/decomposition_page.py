"""The error-decomposition section of report.md / report.html (klgap/report/decomposition.py): one run's facts and its two
parts against their twins, or a study's table across sites. Every number comes from the report."""

from __future__ import annotations

from klgap.render.blocks import Block, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig, fmt_p
from klgap.report.decomposition import ErrorDecomposition, ErrorPart
from klgap.report.schema import BASELINE, MeanCI, RatioCI, Report, StudyReport

ABOUT = ("The SAE's error e = x − x̂ split into e_lin = W x + b, a ridge least-squares fit of e from x, and the rest "
         "e_nl = e − e_lin (Engels et al. 2024). sae_plus_linear_error patches x̂ + e_lin (only the nonlinear error "
         "left), sae_plus_nonlinear_error x̂ + e_nl (only the linear error left); each twin adds a random direction "
         "of the same per-token norm to x. R² is the fraction of Σ‖e‖² that e_lin explains on the measured tokens "
         "(centred: of the error's variance, pooled over dimensions). Σ‖e‖² splits into Σ‖e_lin‖², Σ‖e_nl‖² and the "
         "cross term 2Σ e_lin·e_nl (shares of Σ‖e‖², summing to 1). Engels et al.'s own definitions (their released "
         "code) follow: the per-dimension R² of e_lin averaged unweighted over dimensions, and the R² of a linear "
         "prediction of ‖e‖² from x (\"most of the norm\"; fitted on the same tokens as W, b, with an intercept). "
         "The excess left is (KL(part) − KL(twin)) / (KL(sae) − "
         f"KL({BASELINE})): the share of the SAE's excess KL still there with only that part of the error, shown "
         "where the SAE's excess has an interval that excludes 0. Intervals are bootstraps over whole contexts; p "
         "is the Wilcoxon signed-rank test of part against twin on per-context means, uncorrected.")


def _mean_ci(value: MeanCI | None, sig: bool = False) -> str:
    if value is None:
        return DASH
    return (fmt_ci_sig if sig else fmt_ci)(value.mean, value.ci_low, value.ci_high)


def _ratio(value: RatioCI | None) -> str:
    return DASH if value is None else fmt_ci(value.ratio, value.ci_low, value.ci_high)


def excess_left_text(found: ErrorDecomposition, part: ErrorPart) -> str:
    """The share of the SAE's excess KL left with only `part`'s error, where the SAE's excess (its denominator) has
    an interval that excludes 0; otherwise '—'."""
    excess = found.sae_excess
    if part.excess_left is None or excess is None or excess.ci_low is None or excess.ci_high is None:
        return DASH
    if excess.ci_low <= 0 <= excess.ci_high:
        return DASH
    return _ratio(part.excess_left)


def _part(found: ErrorDecomposition, kept: str) -> ErrorPart | None:
    return next((p for p in found.parts if p.kept == kept), None)


def _fit_text(found: ErrorDecomposition) -> str:
    where = "held out: fitted on tokens apart from the measured ones" if found.held_out else (
        "in-sample: fitted on the measured tokens (give --fit-tokens N for a held-out fit)")
    return f"W, b fitted on {fmt(found.n_fit_tokens)} tokens, {found.fit_source} ({where})."


def run_blocks(report: Report) -> list[Block]:
    found = report.error_decomposition
    if found is None:
        return []
    blocks: list[Block] = [
        Heading(2, "Error decomposition: linear and nonlinear part of the SAE's error"),
        Para(ABOUT), Para(_fit_text(found)),
        Table(["R² of e_lin [95% CI]", "R² centred", "mean ‖e_lin‖/‖e‖ [95% CI]", f"KL sae − KL {BASELINE} [95% CI]"],
              [[_mean_ci(found.r2), fmt(found.r2_centred, 3), _mean_ci(found.lin_norm_frac),
                _mean_ci(found.sae_excess, sig=True)]]),
    ]
    if found.lin_sq_share is not None:
        blocks.append(Table(
            ["Σ‖e_lin‖²/Σ‖e‖² [95% CI]", "Σ‖e_nl‖²/Σ‖e‖² [95% CI]", "2Σ e_lin·e_nl/Σ‖e‖² [95% CI]",
             "R² per dimension, unweighted mean (Engels)", "R² of ‖e‖² from x (Engels)"],
            [[_mean_ci(found.lin_sq_share), _mean_ci(found.nl_sq_share), _mean_ci(found.cross_share),
              fmt(found.r2_dims, 3), fmt(found.r2_norm, 3)]]))
    rows = [[p.intervention, p.kept, _mean_ci(p.kl, sig=True), p.twin, _mean_ci(p.twin_kl, sig=True),
             _ratio(p.kl_ratio), fmt_p(p.wilcoxon_kl.p_value), excess_left_text(found, p)] for p in found.parts]
    if rows:
        blocks.append(Table(["intervention", "error left", "KL [95% CI]", "twin", "KL twin [95% CI]",
                             "ratio part/twin [95% CI]", "Wilcoxon p", "excess left [95% CI]"], rows))
    return blocks


def study_blocks(study: StudyReport) -> list[Block]:
    runs = [run for run in study.runs if run.error_decomposition is not None]
    if not runs:
        return []
    rows = []
    for run in runs:
        found = run.error_decomposition
        nonlinear, linear = _part(found, "nonlinear"), _part(found, "linear")
        rows.append([f"{run.site} L{run.layer}", _mean_ci(found.r2), fmt(found.r2_centred, 3),
                     _mean_ci(found.lin_norm_frac), _mean_ci(found.lin_sq_share), _mean_ci(found.cross_share),
                     fmt(found.r2_dims, 3), fmt(found.r2_norm, 3),
                     *(_ratio(p.kl_ratio) if p else DASH for p in (nonlinear, linear)),
                     *(excess_left_text(found, p) if p else DASH for p in (nonlinear, linear))])
    return [
        Heading(2, "Error decomposition across sites: linear and nonlinear part of the SAE's error"),
        Para(ABOUT), Para(_fit_text(runs[0].error_decomposition)),
        Table(["site/layer", "R² [95% CI]", "R² centred", "‖e_lin‖/‖e‖ [95% CI]", "Σ‖e_lin‖²/Σ‖e‖² [95% CI]",
               "2Σ e_lin·e_nl/Σ‖e‖² [95% CI]", "R² per dim (Engels)", "R² of ‖e‖² (Engels)",
               "only e_nl left: KL ratio to twin", "only e_lin left: KL ratio to twin",
               "only e_nl left: excess left", "only e_lin left: excess left"], rows),
    ]


def blocks(report: Report | StudyReport) -> list[Block]:
    """The section for a run report or a study report; nothing when no run measured the decomposition."""
    return study_blocks(report) if isinstance(report, StudyReport) else run_blocks(report)
