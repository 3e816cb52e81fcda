"""report.md and a self-contained report.html, rebuilt from a run's saved report.json + tokens.parquet.

Both renderings come from one list of blocks (headings, paragraphs, tables, code, figures), so they show
the same content; the HTML escapes every piece of text and embeds the PNGs as base64 data URIs.
Nothing is recomputed: every number comes from the report, every picture from the saved tokens table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from klgap.render.blocks import STYLE, Block, Bullets, Code, Figure, Heading, Para, Table, esc, html_block, md_block
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig, fmt_fixed, fmt_p, fmt_p_holm, interval_holds
from klgap.errors import KlgapError
from klgap.job.folder import atomic_write_bytes
from klgap.report.read import load_report
from klgap.report.schema import (
    BASELINE, Comparison, Curve, InterventionStats, RatioCI, Report, SiteSummary, StudyReport,
)
from klgap.render.lead import lead_blocks
from klgap.render.panel_page import panel_blocks
from klgap.render.study_page import study_blocks
from klgap.render.sweep_page import CAPTION as SWEEP_CAPTION, sweep_blocks
from klgap.report.findings import curve_findings
from klgap.report.sections import present
from klgap.report.summary import precision_sentence, summary_rows
from klgap.report.sweep import is_sweep_point

N_TOP_ROWS = 10


def _where(run: SiteSummary) -> str:
    return f"{run.site} L{run.layer}"


def _precision(report: Report | StudyReport) -> list[Block]:
    """A low-precision run's check against float32, right under the finding (klgap/job/precision.py)."""
    if not isinstance(report, Report) or report.precision is None:
        return []
    return [Para(precision_sentence(report.precision), lead=True)]


def summary_blocks(report: Report | StudyReport) -> list[Block]:
    """The key table (one row per site/layer: KL of the SAE and the baseline, their ratio, the Wilcoxon p), what
    its numbers are, and the Holm families."""
    joint = report.joint if isinstance(report, Report) else None  # a joint run: every site patched together
    rows = [["joint " + " + ".join(f"{s.site} L{s.layer}" for s in joint) if joint else row.where, fmt(row.kl_sae),
             fmt(row.kl_baseline), row.ratio_text(), row.p_text()] for row in summary_rows(report)]
    return [
        Table(["site/layer", "KL sae", f"KL {BASELINE}", "ratio [95% CI]", "Wilcoxon p"], rows),
        Para(f"Mean per-token KL(P_clean ‖ P_patched) in nats for the SAE reconstruction and for {BASELINE} "
             "(a random direction with the SAE's error norm); the ratio's interval is a bootstrap over whole "
             "contexts; the Wilcoxon signed-rank test pairs per-context mean KL."),
        *_holm_families(report),
    ]


def _runs_of(report: Report | StudyReport) -> list[SiteSummary]:
    return list(report.runs) if isinstance(report, StudyReport) else [report]


def _holm_families(report: Report | StudyReport) -> list[Block]:
    """What each Holm correction was made across, as the report recorded it (klgap.report.holm)."""
    tests = [c.wilcoxon_kl for run in _runs_of(report) for c in run.comparisons.values()]
    if not any(t.p_holm is not None for t in tests):
        return []
    families = list(dict.fromkeys(f"{t.holm_family} ({t.holm_family_size} test{'s' * (t.holm_family_size != 1)})"
                                  for t in tests if t.holm_family is not None and t.holm_family_size is not None))
    if not families:  # reports written before klgap 0.3.0
        return [Para("Holm correction: across every Wilcoxon test of this report together (recorded by a klgap "
                     "older than 0.3.0, before it corrected each baseline's tests as a family of their own).")]
    return [Para("Holm correction, one family per baseline (curve points a family of their own); a p-value is "
                 "shown Holm-corrected where its family holds more than one test:"), Bullets(families)]


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


def _sae_lens_scores(report: Report) -> list[Block]:
    scores = report.sae_lens_scores
    if scores is None:
        return []
    return [
        Heading(2, "sae_lens scores"),
        Para("sae_lens's normalised scores against zero ablation, from this run's means: kl_div_score = "
             "(KL_zero − KL_sae) / KL_zero, ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean); 1 is a "
             "perfect reconstruction, 0 no better than zero ablation."),
        Table(["kl_div_score", "ce_loss_score"], [[fmt_fixed(scores.kl_div_score), fmt_fixed(scores.ce_loss_score)]]),
    ]


def _interventions(report: Report) -> list[Block]:
    rows = [[name, fmt(s.n_tokens), fmt(s.n_nonfinite), fmt(s.kl_mean), fmt(s.kl_median), fmt(s.kl_p999),
             fmt(s.ce_delta_mean), fmt(s.ce_delta_median), fmt(s.ce_delta_p999)]
            for name, s in report.interventions.items()]
    return [
        Heading(2, "Interventions"),
        Table(["intervention", "tokens", "non-finite", "KL mean", "KL median", "KL p99.9", "ΔCE mean", "ΔCE median",
               "ΔCE p99.9"], rows),
    ]


def _sae(report: Report) -> list[Block]:
    sae = report.sae
    items = [f"source: {sae.source}", f"hook: {sae.hook_name or DASH}", f"architecture: {sae.architecture}",
             f"d_in: {fmt(sae.d_in)}, d_sae: {fmt(sae.d_sae)}"]
    metrics = report.sae_metrics.model_dump()
    return [Heading(2, "SAE"), Bullets(items), Table(["metric", "value"], [[k, fmt(v)] for k, v in metrics.items()])]


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


def curve_blocks(curve: Curve | None, label: str = "") -> list[Block]:
    """The robustness curve as a table: KL of cosine-matched noise per cosine, the SAE's point, the matching cos."""
    if curve is None:
        return []
    rows = [[fmt_fixed(p.cos), fmt_fixed(p.norm_frac, 2), fmt(p.kl_mean), f"[{fmt(p.kl_ci_low)}, {fmt(p.kl_ci_high)}]",
             fmt(p.ce_delta_mean)] for p in sorted(curve.points, key=lambda p: (p.norm_frac, p.cos))]
    blocks: list[Block] = [Heading(2, f"Robustness curve{f' — {label}' if label else ''}"),
                           Para("Mean KL of cosine_matched noise (random x' at the given cos(x, x') and norm "
                                "norm_frac·‖x‖), with 95% intervals that resample contexts."),
                           Table(["cos", "norm frac", "KL mean", "95% CI", "ΔCE mean"], rows)]
    sae = curve.sae
    if sae is not None:
        items = [f"SAE: mean cos(x, x̂) {fmt_fixed(sae.cos_mean)}, mean ‖x̂‖/‖x‖ "
                 f"{fmt_fixed(sae.norm_frac_mean)}, mean KL {fmt(sae.kl_mean)}", *curve_findings(curve)]
        blocks.append(Bullets(items))
    return blocks


CAPTIONS = {
    "kl_bars": "Mean per-token KL for each intervention{error}.",
    "kl_hist": "Distribution of per-token KL on a log axis (log-spaced bins, density per decade) for the SAE "
               f"reconstruction and {BASELINE}; other interventions as faint lines; dashed lines are means.",
    "kl_by_position": "Mean KL at each context position; bands are ±1.96·SE across contexts for sae and "
                      f"{BASELINE}.",
    "single_token": "Mean KL at offsets 0..k after patching only position t: offset 0 is the patched token, "
                    "later offsets show how the perturbation travels to later positions.",
    "many_samples": "Left: for the first contexts, the KL of random draws with the SAE's KL marked (red). "
                    "Right: the per-context z-scores of the SAE's KL against its draws.",
    "robustness": "Mean KL of cosine-matched noise against its cosine similarity to x, one curve per norm fraction "
                  "(named in the legend), with 95% bands that resample contexts; stars mark the SAE reconstructions "
                  "with their intervals.",
    "length_sweep": SWEEP_CAPTION,
}


def caption_for(path: Path, report: Report | StudyReport) -> str:
    """A caption for a figure file, by its name (a section's figure: the section's caption)."""
    captions = {**CAPTIONS, **{k: v for _, section, _ in present(report) for k, v in section.captions.items()}}
    template = captions.get(path.stem)
    if template is None:
        return path.stem.replace("_", " ")
    error = " per site/layer" if isinstance(report, StudyReport) else " (error bars: ±1.96·SE of the per-context means)"
    return template.format(error=error)


def _overview(report: Report | StudyReport) -> list[Block]:
    if isinstance(report, StudyReport):
        return [Heading(2, "Study"), Bullets([f"model: {report.model}", f"mode: {report.mode}",
                         f"runs: {', '.join(_where(r) for r in report.runs) or DASH}"])]
    items = [
        f"model: {report.model}",
        f"site: {_where(report)} (hook {report.hook_name})",
        f"mode: {report.mode}",
        f"tokens: {fmt(report.n_tokens)} in {fmt(report.n_contexts)} contexts of {fmt(report.context_len)}",
        f"first position: {report.first_position}",
        f"last position: {report.last_position}",
        f"dataset: {report.dataset}{_held_out(report)}",
        f"centred activations: {report.centered_activations}",
    ]
    path = report.execution.get("path")  # execution is free-form in the schema: {"path": ..., and what it chose}
    if path:
        items.append(f"execution: {path}")
    return [Heading(2, "Run"), Bullets(items)]


def _held_out(report: Report) -> str:
    """How the measured tokens stand to the SAE's training tokens, after the dataset (reports since schema 0.6.0)."""
    found = report.held_out
    if found is None:
        return ""
    chosen = f" (the {found.split} split: --dataset named none)" if found.chosen else ""
    if found.status == "disjoint":
        return f"{chosen}; apart from the SAE's training tokens ({found.trained_on})"
    if found.status == "overlap":
        return f"{chosen}; overlaps the SAE's training tokens ({found.trained_on})"
    return chosen


def _notes(report: Report | StudyReport) -> list[Block]:
    """The run's notes; no section at all when there are none."""
    if isinstance(report, StudyReport):
        notes = [f"{_where(r)}: {n}" for r in report.runs for n in r.notes]
    else:
        notes = list(report.notes)
    return [Heading(2, "Notes"), Bullets(notes)] if notes else []


def _figures(report: Report | StudyReport, figures: Sequence[Path]) -> list[Block]:
    if not figures:
        return []
    return [Heading(2, "Figures"), *[Figure(Path(f), caption_for(Path(f), report)) for f in figures]]


def _provenance(report: Report | StudyReport) -> list[Block]:
    prov = report.provenance
    items = [
        f"klgap {prov.klgap_version}, git {prov.git_hash or DASH}",
        f"Python {prov.python} on {prov.platform}",
        f"created: {prov.created_at}",
    ]
    if isinstance(report, Report):
        items += [f"seed: {report.seed}", f"device: {report.device}, dtype: {report.dtype}"]
    blocks: list[Block] = [Heading(2, "Provenance"), Bullets(items)]
    if prov.packages:
        blocks.append(Table(["package", "version"], [[k, str(v) if v is not None else DASH]
                                                     for k, v in prov.packages.items()]))
    if isinstance(report, Report) and report.plugins:
        blocks.append(Table(["used", "plugin", "version"],
                            [[k, p.plugin, p.version or DASH] for k, p in report.plugins.items()]))
    blocks += [Para("Configuration:"), Code(json.dumps(report.config, indent=2, default=str), "json")]
    return blocks


def expectation_blocks(run_dir: Path) -> list[Block]:
    """The "Replication targets" section, when the run was checked against an expected.json (klgap/report/expectations.py)."""
    from klgap.report.expectations import CHECK_FILE, ExpectationCheck
    from klgap.report.validate import validate_one

    if not (run_dir / CHECK_FILE).is_file():
        return []
    check = validate_one(run_dir / CHECK_FILE)  # its schema, then its values: a check its run does not give is refused
    if not isinstance(check, ExpectationCheck):
        raise KlgapError(f"{run_dir / CHECK_FILE} is not an expectation check (it holds a {type(check).__name__})")
    rows = [[v.target.name, v.status, v.text] for v in check.verdicts]
    return [Heading(2, "Replication targets"), Para(f"Checked against {check.expected}: {check.summary()}."),
            Table(["target", "verdict", "measured, interval, source"], rows)]


def title_of(report: Report | StudyReport) -> str:
    if isinstance(report, StudyReport):
        return f"klgap study: {report.model} · {report.mode}"
    if report.joint is not None:
        return f"klgap joint run: {report.model} · {' + '.join(s.hook_name for s in report.joint)} · {report.mode}"
    return f"klgap report: {report.model} · {report.hook_name or _where(report)} · {report.mode}"


def document(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> list[Block]:
    """The report as blocks, in reading order: the verdict, the key table, then notes, what was run, the details
    (`extra`: sections from beside report.json, e.g. replication targets), figures and provenance."""
    found = [(section, section.blocks(report) if section.blocks is not None else [])
             for _, section, _ in present(report)]
    leads = [block for section, blocks in found if section.lead for block in blocks]  # e.g. a study over checkpoints
    # the page's own finding (render/lead.py), a low-precision run's check under it, then the key table
    lead = leads or [*lead_blocks(report), *_precision(report), *summary_blocks(report)]
    blocks: list[Block] = [Heading(1, title_of(report)), *lead, *panel_blocks(report), *extra, *_notes(report),
                           *_overview(report), *(study_blocks(report) if isinstance(report, StudyReport) else []),
                           *(block for section, blocks in found if not section.lead for block in blocks)]
    if isinstance(report, Report):
        blocks += [*_comparisons(report), *_interventions(report), *_sae_lens_scores(report), *_sae(report),
                   *_single_token(report), *_many_samples(report), *_gap(report), *curve_blocks(report.curve),
                   *sweep_blocks(report)]
    return blocks + _figures(report, figures) + _provenance(report)


def render_markdown(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> str:
    """report.md: figures are linked by file name (they lie beside the report)."""
    return "\n\n".join(md_block(b) for b in document(report, figures, extra)) + "\n"


def render_html(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> str:
    """report.html: one self-contained page (inline CSS, PNGs as data URIs, no scripts, no external assets)."""
    body = "\n".join(html_block(b) for b in document(report, figures, extra))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title_of(report))}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- a run folder


#: figures drawn only from tokens.parquet, in page order; kept as they are where that table is gone
TOKEN_FIGURES = ("kl_hist.png", "kl_by_position.png", "many_samples.png")
PAGE_ORDER = ("kl_bars.png", *TOKEN_FIGURES[:2], "single_token.png", TOKEN_FIGURES[2], "robustness.png",
              "length_sweep.png")


def rebuild(run_dir: str | Path) -> dict[str, Path]:
    """(Re)write the figures, report.md and report.html of a run folder from report.json + tokens.parquet.

    Nothing is recomputed. A study also rebuilds each site/layer folder holding a report.json. Without
    tokens.parquet (committed results keep only report.json and the figures), the figures drawn from the report
    are redrawn and those only the tokens table can draw are kept as they are. Returns {file name: path} for
    every file written.
    """
    from klgap.figures.runs import figures_for_run, read_tokens

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    written: dict[str, Path] = {}
    if isinstance(report, StudyReport):  # each site/layer's own figures and pages, then the study's
        for run in report.runs:
            sub = run_dir / run.path
            if (sub / "report.json").is_file():
                written.update({f"{run.path}/{name}": path for name, path in rebuild(sub).items()})
    tokens = read_tokens(run_dir) if isinstance(report, Report) else None
    sections = [section for _, section, _ in present(report) if section.figures is not None]
    own = [f for section in sections for f in section.figures(report, run_dir)]  # type: ignore[misc]
    leads = any(section.lead for section in sections)  # its figures replace the run's (a study over checkpoints)
    figures = own if leads else [*figures_for_run(run_dir, report, tokens), *own]
    written.update({f.name: f for f in figures})
    if isinstance(report, Report) and tokens is None:
        figures += [run_dir / name for name in TOKEN_FIGURES if (run_dir / name).is_file()]
        figures.sort(key=lambda f: PAGE_ORDER.index(f.name) if f.name in PAGE_ORDER else len(PAGE_ORDER))
    extra = expectation_blocks(run_dir)
    for name, text in (("report.md", render_markdown(report, figures, extra)),
                       ("report.html", render_html(report, figures, extra))):
        atomic_write_bytes(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written
