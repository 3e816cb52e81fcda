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
from klgap.render.formatting import DASH, fmt, fmt_fixed
from klgap.errors import KlgapError
from klgap.job.folder import atomic_write_bytes
from klgap.report.read import load_report
from klgap.report.schema import BASELINE, Curve, Report, SiteSummary, StudyReport
from klgap.render.lead import lead_blocks
from klgap.render.panel_page import panel_blocks
from klgap.render.run_details import detail_blocks
from klgap.render.study_page import study_blocks
from klgap.render.sweep_page import CAPTION as SWEEP_CAPTION, sweep_blocks
from klgap.report.findings import curve_findings
from klgap.report.sections import present
from klgap.report.summary import precision_sentence, summary_rows

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
        blocks += [*detail_blocks(report), *curve_blocks(report.curve), *sweep_blocks(report)]
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
