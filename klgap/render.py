"""report.md and a self-contained report.html, rebuilt from a run's saved report.json + tokens.parquet.

Both renderings come from one list of blocks (headings, paragraphs, tables, code, figures), so they show
the same content; the HTML escapes every piece of text and embeds the PNGs as base64 data URIs.
Nothing is recomputed: every number comes from the report, every picture from the saved tokens table.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from klgap.formatting import DASH, fmt, fmt_ci, fmt_fixed, fmt_p
from klgap.rundir import atomic_write_bytes
from klgap.schema import BASELINE, Curve, RatioCI, Report, SiteSummary, StudyReport, load_report
from klgap.summary import summary_rows

N_TOP_ROWS = 10


# ----------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


Block = Union[Heading, Para, Bullets, Table, Code, Figure]


def _where(run: SiteSummary) -> str:
    return f"{run.site} L{run.layer}"


def _summary(report: Report | StudyReport) -> list[Block]:
    rows = [[row.where, fmt(row.kl_sae), fmt(row.kl_baseline), row.ratio_text(), row.p_text()]
            for row in summary_rows(report)]
    return [
        Heading(2, "Summary"),
        Para(f"Mean per-token KL(P_clean ‖ P_patched) in nats for the SAE reconstruction and for {BASELINE} "
             "(a random direction with the SAE's error norm); the ratio's interval is a bootstrap over whole "
             "contexts; the Wilcoxon signed-rank test pairs per-context mean KL."),
        Table(["site/layer", "KL sae", f"KL {BASELINE}", "ratio [95% CI]", "Wilcoxon p"], rows),
    ]


def _ci(ratio: RatioCI) -> str:
    return fmt_ci(ratio.ratio, ratio.ci_low, ratio.ci_high)


def _comparisons(report: Report) -> list[Block]:
    if not report.comparisons:
        return []
    rows = [[name, _ci(comp.kl_ratio), _ci(comp.ce_delta_ratio), fmt(comp.wilcoxon_kl.statistic),
             fmt_p(comp.wilcoxon_kl.p_value), fmt_p(comp.wilcoxon_kl.p_holm) if comp.wilcoxon_kl.p_holm is not None else DASH,
             fmt_fixed(comp.wilcoxon_kl.effect_size), fmt(comp.wilcoxon_kl.n_contexts)]
            for name, comp in report.comparisons.items()]
    return [
        Heading(2, "SAE against each baseline"),
        Table(["baseline", "KL ratio sae/baseline [95% CI]", "ΔCE ratio [95% CI]", "Wilcoxon W", "p", "p (Holm)",
               "effect size (rank-biserial)", "contexts"], rows),
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
                 f"{fmt_fixed(sae.norm_frac_mean)}, mean KL {fmt(sae.kl_mean)}"]
        for frac, cos in curve.sae_equivalent_cos.items():
            items.append(f"at norm {frac}·‖x‖, noise does the SAE's damage at cos {fmt_fixed(cos)}" if cos is not None
                         else f"at norm {frac}·‖x‖, the SAE's KL lies outside the curve's range")
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
    "robustness": "Mean KL against the cosine similarity of the substitute; stars mark the SAE reconstructions.",
}


def caption_for(path: Path, report: Report | StudyReport) -> str:
    """A caption for a figure file, by its name."""
    template = CAPTIONS.get(path.stem)
    if template is None:
        return path.stem.replace("_", " ")
    error = " per site/layer" if isinstance(report, StudyReport) else " (error bars: ±1.96·SE of the per-context means)"
    return template.format(error=error)


def _overview(report: Report | StudyReport) -> list[Block]:
    if isinstance(report, StudyReport):
        return [Bullets([f"model: {report.model}", f"mode: {report.mode}",
                         f"runs: {', '.join(_where(r) for r in report.runs) or DASH}"])]
    items = [
        f"model: {report.model}",
        f"site: {_where(report)} (hook {report.hook_name})",
        f"mode: {report.mode}",
        f"tokens: {fmt(report.n_tokens)} in {fmt(report.n_contexts)} contexts of {fmt(report.context_len)}",
        f"first position: {report.first_position}",
        f"last position: {report.last_position}",
        f"dataset: {report.dataset}",
        f"centred activations: {report.centered_activations}",
    ]
    path = report.execution.get("path")  # execution is free-form in the schema: {"path": ..., and what it chose}
    if path:
        items.append(f"execution: {path}")
    return [Bullets(items)]


def _notes(report: Report | StudyReport) -> list[Block]:
    if isinstance(report, StudyReport):
        notes = [f"{_where(r)}: {n}" for r in report.runs for n in r.notes]
    else:
        notes = list(report.notes)
    return [Heading(2, "Notes"), Bullets(notes) if notes else Para("None.")]


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


def _compounding(report: Report) -> list[Block]:
    """A joint run: every site patched together against each alone (klgap/compounding.py)."""
    found = report.compounding
    if found is None:
        return []
    sites = [[site.hook_name, _ci(site.kl_ratio) if site.kl_ratio else DASH,
              *(fmt(site.kl_mean.get(name)) for name in found.additivity), site.path] for site in found.sites]
    blocks: list[Block] = [
        Heading(2, "Compounding"),
        Para("Every site patched in the same forward (joint) against each site patched alone, on the same tokens; "
             "intervals are bootstraps over whole contexts, tests pair per-context means."),
        Table(["site alone", f"KL ratio sae/{BASELINE} [95% CI]", *(f"KL {n}" for n in found.additivity), "folder"],
              sites),
    ]
    if found.joint_kl_ratio is not None:
        bullets = [f"joint KL ratio sae/{BASELINE}: {_ci(found.joint_kl_ratio)}"]
        diff = found.joint_minus_max_single_ratio
        if diff is not None:
            bullets.append(f"joint ratio − largest single-site ratio ({found.max_single}, "
                           f"{fmt_fixed(found.max_single_kl_ratio)}): {fmt_ci(diff.estimate, diff.ci_low, diff.ci_high)}, "
                           f"one-sided p = {fmt_p(diff.p_value)}")
        blocks.append(Bullets(bullets))
    rows = [[name, fmt(a.joint_kl_mean), fmt(a.sum_single_kl_mean), _ci(a.joint_over_sum),
             fmt_p(a.wilcoxon_joint_vs_sum.p_value), fmt(a.joint_ce_delta_mean), fmt(a.sum_single_ce_delta_mean),
             a.verdict] for name, a in found.additivity.items()]
    return blocks + [Table(["intervention", "joint KL", "Σ KL alone", "joint/Σ [95% CI]", "Wilcoxon p",
                            "joint ΔCE", "Σ ΔCE alone", "verdict"], rows)]
def expectation_blocks(run_dir: Path) -> list[Block]:
    """The "Replication targets" section, when the run was checked against an expected.json (klgap/expectations.py)."""
    from klgap.expectations import load_check

    check = load_check(run_dir)
    if check is None:
        return []
    rows = [[v.target.name, v.status, v.text] for v in check.verdicts]
    return [Heading(2, "Replication targets"), Para(f"Checked against {check.expected}: {check.summary()}."),
            Table(["target", "verdict", "measured, interval, source"], rows)]


def title_of(report: Report | StudyReport) -> str:
    if isinstance(report, StudyReport):
        return f"klgap study: {report.model} · {report.mode}"
    return f"klgap report: {report.model} · {report.hook_name or _where(report)} · {report.mode}"


def document(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> list[Block]:
    """The report as blocks, in reading order (`extra`: sections from beside report.json, e.g. replication targets)."""
    blocks: list[Block] = [Heading(1, title_of(report)), *_overview(report), *_notes(report), *_summary(report), *extra]
    if isinstance(report, Report):
        blocks += [*_compounding(report), *_comparisons(report), *_interventions(report), *_sae_lens_scores(report),
                   *_sae(report), *_single_token(report),
                   *_many_samples(report), *_gap(report), *curve_blocks(report.curve)]
    return blocks + _figures(report, figures) + _provenance(report)


# ----------------------------------------------------------------------------- markdown


def _md_text(text: str) -> str:
    """Plain text for markdown: no raw HTML, no accidental line breaks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|")


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_md_text(block.text)}"
    if isinstance(block, Para):
        return _md_text(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_text(item)}" for item in block.items)
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |",
                 "|" + "|".join("---" for _ in block.header) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Code):
        longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
        fence = "`" * max(3, longest + 1)
        return f"{fence}{block.lang}\n{block.text}\n{fence}"
    if isinstance(block, Figure):
        return f"![{block.path.stem}]({block.path.name})\n\n*{_md_text(block.caption)}*"
    raise TypeError(f"unknown block {block!r}")


def render_markdown(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> str:
    """report.md: figures are linked by file name (they lie beside the report)."""
    return "\n\n".join(_md_block(b) for b in document(report, figures, extra)) + "\n"


# ----------------------------------------------------------------------------- html

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
    "table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}"
    "pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}"
    "figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}"
)


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_esc(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f"<p>{_esc(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_esc(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_esc(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Code):
        return f"<pre><code>{_esc(block.text)}</code></pre>"
    if isinstance(block, Figure):
        return (f'<figure><img src="{_png_uri(block.path)}" alt="{_esc(block.path.stem)}">'
                f"<figcaption>{_esc(block.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {block!r}")


def render_html(report: Report | StudyReport, figures: Sequence[Path], extra: Sequence[Block] = ()) -> str:
    """report.html: one self-contained page (inline CSS, PNGs as data URIs, no scripts, no external assets)."""
    body = "\n".join(_html_block(b) for b in document(report, figures, extra))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title_of(report))}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- a run folder


def rebuild(run_dir: str | Path) -> dict[str, Path]:
    """(Re)write the figures, report.md and report.html of a run folder from report.json + tokens.parquet.

    Nothing is recomputed. Returns {file name: path} for every file written.
    """
    from klgap.plots import figures_for_run, read_tokens

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    written: dict[str, Path] = {}
    if isinstance(report, StudyReport):  # each site/layer's own figures and pages, then the study's
        for run in report.runs:
            sub = run_dir / run.path
            if (sub / "report.json").is_file() and (sub / "tokens.parquet").is_file():
                written.update({f"{run.path}/{name}": path for name, path in rebuild(sub).items()})
    tokens = read_tokens(run_dir) if isinstance(report, Report) else None
    figures = figures_for_run(run_dir, report, tokens)
    written.update({f.name: f for f in figures})
    extra = expectation_blocks(run_dir)
    for name, text in (("report.md", render_markdown(report, figures, extra)),
                       ("report.html", render_html(report, figures, extra))):
        atomic_write_bytes(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written
