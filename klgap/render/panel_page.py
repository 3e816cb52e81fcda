"""The baseline panel and the ratio at matched error size as page blocks and terminal lines (klgap/report/panel.py,
klgap/report/size_bins.py): a run's page gets a row per baseline; a study's and a comparison's one matrix of site/layer
(or run) against baseline. Every number is read from the typed report."""

from __future__ import annotations

from collections.abc import Sequence

from klgap.render.blocks import Block, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_fixed, fmt_p_holm
from klgap.report.panel import ALPHA, Panel, baseline_panel
from klgap.report.schema import BASELINE, Report, SiteSummary, SizeBin, SizeBins, StudyReport

PANEL_TEXT = ("The SAE against every baseline this run measured (the interventions their plugins declare baselines): "
              "KL(sae)/KL(baseline) with a 95% interval that resamples whole contexts, the Wilcoxon signed-rank p on "
              "per-context mean KL with its Holm correction (one family per baseline), and the verdict: the gap "
              f"holds where the interval lies above 1 and the Holm-corrected p ≤ {ALPHA:g}, is reversed where it "
              "lies below 1 with that p, and is not resolved otherwise.")
BINS_TEXT = ("KL(sae)/KL(baseline) over the tokens whose SAE error ε = ‖x − x̂‖ is the given fraction of ‖x‖ (fixed "
             "bins, the same in every report, so SAEs of different fidelity compare at the same relative error; KL "
             "grows faster than quadratically in ε, so a raw ratio favours the SAE with the smaller error), with 95% "
             "intervals that resample contexts.")


def _runs(report: Report | StudyReport) -> list[SiteSummary]:
    return list(report.runs) if isinstance(report, StudyReport) else [report]


def panels(report: Report | StudyReport) -> list[tuple[str, Panel]]:
    """(site/layer, panel) for each run of the report that says which of its interventions are baselines."""
    out = []
    for run in _runs(report):
        panel = baseline_panel(run, report.model, report.mode)
        if panel is not None and panel.rows:
            out.append((f"{run.site} L{run.layer}", panel))
    return out


def cell(panel: Panel, baseline: str) -> str:
    """A matrix cell: '1.462× [1.407, 1.522] holds'; '—' where the run did not measure that baseline."""
    row = next((r for r in panel.rows if r.baseline == baseline), None)
    return f"{row.ratio_text()} {row.verdict}" if row is not None else DASH


def panel_matrix(entries: Sequence[tuple[str, Panel]], first: str = "site/layer") -> Table:
    """One row per (label, panel), one column per baseline any of them measured (in order of first appearance)."""
    names = list(dict.fromkeys(r.baseline for _, panel in entries for r in panel.rows))
    return Table([first, *names], [[label, *(cell(panel, name) for name in names)] for label, panel in entries])


def panel_blocks(report: Report | StudyReport) -> list[Block]:
    """The 'Baselines' section: a run's panel table (or a study's matrix) and the ratio at matched error size."""
    found = panels(report)
    if not found:
        return []
    blocks: list[Block] = [Heading(2, "Baselines"), Para(PANEL_TEXT)]
    if isinstance(report, StudyReport):
        blocks.append(panel_matrix(found))
    else:
        panel = found[0][1]
        blocks.append(Table(["baseline", "what it is", "KL ratio sae/baseline [95% CI]", "Wilcoxon p (Holm)", "verdict"],
                            [[r.baseline, r.label, fmt_ci(r.ratio, r.ci_low, r.ci_high),
                              fmt_p_holm(r.p_value, r.p_holm, r.holm_family_size), r.short()] for r in panel.rows]))
    return blocks + matched_size_blocks(report)


def bin_label(found: SizeBin) -> str:
    """'[0.2, 0.3)'; '≥ 1' for the open last bin."""
    return f"≥ {found.low:g}" if found.high is None else f"[{found.low:g}, {found.high:g})"


def equivalent_cos_line(run: SiteSummary) -> str | None:
    """The noise-equivalent cosine beside the headline, from the run's robustness curve (its first norm fraction);
    None without a curve."""
    curve = run.curve
    if curve is None or curve.sae is None or not curve.sae_equivalent_cos:
        return None
    frac, cos = next(iter(curve.sae_equivalent_cos.items()))
    if cos is None:
        return (f"Noise-equivalent cosine: cosine-matched noise at norm {frac}·‖x‖ never does the SAE's damage on the "
                f"measured grid (the SAE's own cos(x, x̂) is {fmt_fixed(curve.sae.cos_mean)}).")
    return (f"Noise-equivalent cosine: cosine-matched noise at norm {frac}·‖x‖ does the SAE's damage at cos "
            f"{fmt_fixed(cos)}; the SAE's own cos(x, x̂) is {fmt_fixed(curve.sae.cos_mean)}.")


def headline_of(bins: SizeBins) -> str:
    """The baseline a study's or comparison's matched-size matrix shows: epsilon_random when binned, else the first."""
    return BASELINE if BASELINE in bins.baselines else bins.baselines[0]


def matched_size_blocks(report: Report | StudyReport) -> list[Block]:
    """The ratio in bins of ε/‖x‖ (a run: a row per bin, a column per baseline; a study: a row per site/layer
    against epsilon_random), and the noise-equivalent cosine where there is a robustness curve."""
    runs = [run for run in _runs(report) if run.size_bins is not None and run.size_bins.bins]
    lines = [line for run in _runs(report) if (line := equivalent_cos_line(run)) is not None]
    if not runs and not lines:
        return []
    blocks: list[Block] = [Heading(3, "At matched error size")]
    if runs and isinstance(report, StudyReport):
        blocks += [Para(BINS_TEXT), size_matrix([(f"{run.site} L{run.layer}", run.size_bins) for run in runs])]
    elif runs:
        bins = runs[0].size_bins
        blocks += [Para(BINS_TEXT),
                   Table(["ε/‖x‖", "tokens", "KL sae", *bins.baselines],
                         [[bin_label(b), fmt(b.n_tokens), fmt(b.kl_sae),
                           *(fmt_ci(b.ratios[n].ratio, b.ratios[n].ci_low, b.ratios[n].ci_high) if n in b.ratios
                             else DASH for n in bins.baselines)] for b in bins.bins])]
    return blocks + [Para(line) for line in lines]


def size_matrix(entries: Sequence[tuple[str, SizeBins]], first: str = "site/layer") -> Table:
    """One row per (label, bins), one column per ε/‖x‖ bin any holds: the ratio over the headline baseline."""
    columns = {b.low: bin_label(b) for _, bins in entries for b in bins.bins}

    def ratio(bins: SizeBins, low: float) -> str:
        found = next((b for b in bins.bins if b.low == low), None)
        name = headline_of(bins)
        if found is None or name not in found.ratios:
            return DASH
        r = found.ratios[name]
        return f"{fmt_ci(r.ratio, r.ci_low, r.ci_high)} ({found.n_tokens} tok)"

    names = list(dict.fromkeys(headline_of(bins) for _, bins in entries))
    return Table([f"{first} (vs {', '.join(names)})", *[f"ε/‖x‖ {columns[low]}" for low in sorted(columns)]],
                 [[label, *(ratio(bins, low) for low in sorted(columns))] for label, bins in entries])


Labelled = tuple[str, Panel | None, SizeBins | None]  # a compared run: its label, its panel, its ε/‖x‖ bins


def comparison_blocks(runs: Sequence[Labelled]) -> list[Block]:
    """compare.md's sections: the panel matrix (run × baseline) and the matched-size matrix (run × ε/‖x‖ bin)."""
    blocks: list[Block] = []
    panelled = [(label, panel) for label, panel, _ in runs if panel is not None and panel.rows]
    if panelled:
        blocks += [Heading(2, "Baselines"), Para(PANEL_TEXT), panel_matrix(panelled, "run")]
    binned = [(label, bins) for label, _, bins in runs if bins is not None and bins.bins]
    if binned:
        blocks += [Heading(2, "At matched error size"), Para(BINS_TEXT), size_matrix(binned, "run")]
    return blocks


def matrix_text(runs: Sequence[Labelled]) -> str:
    """The panel matrix for the terminal (`klgap compare`), '' when no run says which interventions are baselines."""
    panelled = [(label, panel) for label, panel, _ in runs if panel is not None and panel.rows]
    if not panelled:
        return ""
    matrix = panel_matrix(panelled, "run")
    return "\n".join("  ".join(row) for row in [matrix.header, *matrix.rows])


def panel_lines(report: Report) -> list[str]:
    """The terminal's panel: a line per baseline (when the run measured more than epsilon_random), then the ratio
    per ε/‖x‖ bin against the headline baseline."""
    found = panels(report)
    lines = []
    if found and [r.baseline for r in found[0][1].rows] != [BASELINE]:
        lines += [f"  {r.baseline:<28} {r.line()}" for r in found[0][1].rows]
    bins = report.size_bins
    if bins is not None and bins.bins:
        name = headline_of(bins)
        cells = [f"{bin_label(b)} {fmt_ci(b.ratios[name].ratio, b.ratios[name].ci_low, b.ratios[name].ci_high)} "
                 f"({b.n_tokens} tok)" for b in bins.bins if name in b.ratios]
        lines.append(f"ratio over {name} at matched ε/‖x‖: " + "; ".join(cells))
    return lines


__all__ = ["cell", "comparison_blocks", "equivalent_cos_line", "matrix_text", "matched_size_blocks", "panel_blocks", "panel_lines", "panel_matrix",
           "panels", "size_matrix"]
