"""A study's page beyond its verdicts and summary table: each site/layer's SAE quality and tokens, a link to its
own page, and how the per-token gaps of the sites/layers go together (the study's gap correlations)."""

from __future__ import annotations

from klgap.render.blocks import Block, Bullets, Heading, PageLinks, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_fixed, fmt_p
from klgap.report.schema import BASELINE, SaeLensScores, StudyReport, StudyRun


def _where(run: StudyRun) -> str:
    return f"{run.site} L{run.layer}"


def score_texts(scores: SaeLensScores) -> tuple[str, str]:
    """kl_div_score and ce_loss_score as a page prints them: each with its interval; a withheld ce_loss_score as
    'withheld'."""
    def shown(value: float | None, ci: tuple[float, float] | None) -> str:
        return fmt_fixed(value) if ci is None else fmt_ci(value, *ci)

    ce = "withheld" if scores.ce_loss_score_withheld else shown(scores.ce_loss_score, scores.ce_loss_score_ci)
    return shown(scores.kl_div_score, scores.kl_div_score_ci), ce


def quality_table(report: StudyReport) -> list[Block]:
    """A row per site/layer: its hook, tokens (contexts), the SAE's width and its quality on those tokens
    (explained variance, L0, mean cos(x, x̂), sae_lens's kl_div_score / ce_loss_score where zero ablation was
    measured, and the clean CE where the run recorded it), then each SAE's quality notes (klgap/report/quality.py)."""
    scored = any(run.sae_lens_scores is not None for run in report.runs)
    header = ["site/layer", "hook", "tokens (contexts)", "d_sae", "explained variance", "L0", "cos(x, x̂)"]
    header += ["kl_div_score", "ce_loss_score"] if scored else []
    with_clean = any(run.ce_clean is not None for run in report.runs)
    header += ["clean CE, nats"] if with_clean else []
    rows = []
    for run in report.runs:
        metrics, scores = run.sae_metrics, run.sae_lens_scores
        row = [_where(run), run.hook_name, f"{run.n_tokens:,} ({run.n_contexts:,})", fmt(run.sae.d_sae),
               fmt_fixed(metrics.explained_variance), fmt(metrics.l0_mean), fmt_fixed(metrics.cos_mean)]
        if scored:
            row += list(score_texts(scores)) if scores else [DASH, DASH]
        if with_clean:
            row.append(fmt_fixed(run.ce_clean.mean) if run.ce_clean else DASH)
        rows.append(row)
    about = ("Each site/layer measured its own tokens with its own SAE; explained variance, L0 and cos(x, x̂) are the "
             "SAE's on those tokens.")
    if scored:
        about += (" kl_div_score and ce_loss_score are sae_lens's scores against zero ablation (1: a perfect "
                  "reconstruction, 0: no better than zero), where the run measured zero.")
    notes = [f"{_where(run)}: {note.text}" for run in report.runs for note in run.quality_notes]
    noted = [Para("Quality notes (the verdicts above are about these SAEs as they are):"), Bullets(notes)] if notes else []
    return [Heading(2, "Sites/layers"), Table(header, rows), Para(about), *noted]


def run_links(report: StudyReport) -> list[Block]:
    """Each site/layer's own page (its report in its folder)."""
    items = [(f"{_where(run)}: {run.hook_name} ({run.n_tokens:,} tokens)", run.path) for run in report.runs]
    return [Para("Each site/layer's own page (its figures, interventions, comparisons and provenance):"),
            PageLinks(items)]


def gap_correlations(report: StudyReport) -> list[Block]:
    """The Spearman correlation of the per-token gap KL(sae) − KL(baseline) between every pair of sites/layers."""
    pairs = report.gap_correlation_between_runs
    if not pairs:
        return []
    names = {run.path: _where(run) for run in report.runs}
    rows = [[names.get(p.a, p.a), names.get(p.b, p.b), fmt_fixed(p.rho), fmt_p(p.p_value), fmt(p.n)] for p in pairs]
    return [Heading(2, "Gap correlations between sites/layers"),
            Para(f"Spearman correlation of the per-token gap KL(sae) − KL({BASELINE}) between two sites/layers, over "
                 "the tokens both measured (uncorrected p): do the same tokens suffer the SAE's excess at both?"),
            Table(["site/layer", "with", "rho", "p", "tokens"], rows)]


def study_blocks(report: StudyReport) -> list[Block]:
    """The study's own sections, after its verdicts and summary table."""
    return [*quality_table(report), *run_links(report), *gap_correlations(report)]
