"""report.md and a self-contained report.html, rebuilt from a run's saved report.json + tokens.parquet.

Both renderings come from one list of blocks (headings, paragraphs, tables, code, figures), so they show
the same content; the HTML escapes every piece of text and embeds the PNGs as base64 data URIs.
Nothing is recomputed: every number comes from the report, every picture from the saved tokens table.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from klgap.rundir import atomic_write_bytes

BASELINE = "epsilon_random"
DASH = "—"
N_TOP_ROWS = 10

# ----------------------------------------------------------------------------- number formatting


def fmt_num(value: Any, digits: int = 4) -> str:
    """`digits` significant digits; None (a NaN saved as null) -> '—', NaN -> 'nan', ints as they are."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_fixed(value: Any, decimals: int = 3) -> str:
    """`decimals` places (ratios); None -> '—', NaN -> 'nan'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{decimals}f}"
    return fmt_num(value)


def fmt_p(value: Any) -> str:
    """p-values: 0.012, or 3.52e-12 below 0.001."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}" if value >= 1e-3 else f"{value:.2e}"
    return fmt_num(value)


def fmt_ratio_ci(ratio: Mapping[str, Any] | None) -> str:
    """'1.462 [1.401, 1.530]' from a {ratio, ci_low, ci_high} block."""
    if not ratio:
        return DASH
    return f"{fmt_fixed(ratio.get('ratio'))} [{fmt_fixed(ratio.get('ci_low'))}, {fmt_fixed(ratio.get('ci_high'))}]"


def fmt_wilcoxon_p(test: Mapping[str, Any] | None) -> str:
    """The Wilcoxon p-value, with the Holm-corrected one when the report has it."""
    if not test:
        return DASH
    text = fmt_p(test.get("p_value"))
    if "p_holm" in test:
        text += f" (Holm {fmt_p(test.get('p_holm'))})"
    return text


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


def _site_layer(run: Mapping[str, Any]) -> str:
    layer = run.get("layer")
    return f"{run.get('site', '?')}" + (f" L{layer}" if layer is not None else "")


def summary_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """One row per site/layer: site/layer | KL sae | KL epsilon_random | ratio [95% CI] | Wilcoxon p."""
    runs = report.get("runs", []) if report.get("kind") == "study" else [report]
    rows = []
    for run in runs:
        interventions = run.get("interventions") or {}
        comparison = (run.get("comparisons") or {}).get(BASELINE) or {}
        ratio = comparison.get("kl_ratio")
        if not ratio and BASELINE in interventions and "sae" in interventions:
            ratio = {"ratio": run.get("kl_ratio_sae_over_epsilon_random"), "ci_low": None, "ci_high": None}
        rows.append([
            _site_layer(run),
            fmt_num((interventions.get("sae") or {}).get("kl_mean")),
            fmt_num((interventions.get(BASELINE) or {}).get("kl_mean")),
            fmt_ratio_ci(ratio),
            fmt_wilcoxon_p(comparison.get("wilcoxon_kl")),
        ])
    return rows


def _summary(report: Mapping[str, Any]) -> list[Block]:
    return [
        Heading(2, "Summary"),
        Para(f"Mean per-token KL(P_clean ‖ P_patched) in nats for the SAE reconstruction and for {BASELINE} "
             "(a random direction with the SAE's error norm); the ratio's interval is a bootstrap over whole "
             "contexts; the Wilcoxon signed-rank test pairs per-context mean KL."),
        Table(["site/layer", "KL sae", f"KL {BASELINE}", "ratio [95% CI]", "Wilcoxon p"], summary_rows(report)),
    ]


def _comparisons(report: Mapping[str, Any]) -> list[Block]:
    comparisons = report.get("comparisons") or {}
    if not comparisons:
        return []
    rows = []
    for name, comp in comparisons.items():
        test = comp.get("wilcoxon_kl") or {}
        rows.append([name, fmt_ratio_ci(comp.get("kl_ratio")), fmt_ratio_ci(comp.get("ce_delta_ratio")),
                     fmt_num(test.get("statistic")), fmt_p(test.get("p_value")),
                     fmt_p(test.get("p_holm")) if "p_holm" in test else DASH,
                     fmt_fixed(test.get("effect_size")), fmt_num(test.get("n_contexts"))])
    return [
        Heading(2, "SAE against each baseline"),
        Table(["baseline", "KL ratio sae/baseline [95% CI]", "ΔCE ratio [95% CI]", "Wilcoxon W", "p", "p (Holm)",
               "effect size (rank-biserial)", "contexts"], rows),
    ]


def _interventions(report: Mapping[str, Any]) -> list[Block]:
    rows = [
        [name, fmt_num(s.get("n_tokens")), fmt_num(s.get("n_nonfinite")), fmt_num(s.get("kl_mean")),
         fmt_num(s.get("kl_median")), fmt_num(s.get("kl_p999")), fmt_num(s.get("ce_delta_mean")),
         fmt_num(s.get("ce_delta_median")), fmt_num(s.get("ce_delta_p999"))]
        for name, s in (report.get("interventions") or {}).items()
    ]
    return [
        Heading(2, "Interventions"),
        Table(["intervention", "tokens", "non-finite", "KL mean", "KL median", "KL p99.9", "ΔCE mean", "ΔCE median",
               "ΔCE p99.9"], rows),
    ]


def _sae(report: Mapping[str, Any]) -> list[Block]:
    sae = report.get("sae") or {}
    items = [f"source: {sae.get('source', DASH)}", f"hook: {sae.get('hook_name') or DASH}",
             f"architecture: {sae.get('architecture', DASH)}",
             f"d_in: {fmt_num(sae.get('d_in'))}, d_sae: {fmt_num(sae.get('d_sae'))}"]
    metrics = report.get("sae_metrics") or {}
    return [Heading(2, "SAE"), Bullets(items), Table(["metric", "value"], [[k, fmt_num(v)] for k, v in metrics.items()])]


def _gap(report: Mapping[str, Any]) -> list[Block]:
    gap = report.get("gap")
    if not gap:
        return []
    baseline = gap.get("baseline", BASELINE)
    blocks: list[Block] = [
        Heading(2, f"Per-token gap KL(sae) − KL({baseline})"),
        Bullets([f"mean gap: {fmt_num(gap.get('gap_mean'))}",
                 f"fraction of tokens with a positive gap: {fmt_fixed(gap.get('frac_tokens_gap_positive'))}"]),
    ]
    spearman = gap.get("spearman") or {}
    if spearman:
        blocks += [Para("Spearman correlation of the gap with per-token quantities:"),
                   Table(["with", "rho", "p", "n"], [[k, fmt_fixed(c.get("rho")), fmt_p(c.get("p_value")),
                                                     fmt_num(c.get("n"))] for k, c in spearman.items()])]
    top = gap.get("top_tokens") or []
    if top:
        blocks += [Para(f"Tokens with the largest mean gap (first {min(len(top), N_TOP_ROWS)}):"),
                   Table(["token", "id", "mean gap", "count"],
                         [[repr(t.get("token")) if t.get("token") is not None else DASH, fmt_num(t.get("token_id")),
                           fmt_num(t.get("mean_gap")), fmt_num(t.get("count"))] for t in top[:N_TOP_ROWS]])]
    return blocks


def _single_token(report: Mapping[str, Any]) -> list[Block]:
    single = report.get("single_token")
    if not single:
        return []
    by_offset = single.get("kl_by_offset") or {}
    names = list(by_offset)
    offsets = sorted({int(o) for curve in by_offset.values() for o in curve})
    rows = [[f"t+{o}", *[fmt_num(by_offset[n].get(str(o))) for n in names]] for o in offsets]
    return [
        Heading(2, f"Single token: patched at t = {single.get('position')}, measured to t+{single.get('k')}"),
        Para("Mean KL at each offset after the patched token, per intervention."),
        Table(["offset", *names], rows),
    ]


def _many_samples(report: Mapping[str, Any]) -> list[Block]:
    many = report.get("many_samples")
    if not many:
        return []
    position = (report.get("config") or {}).get("position")
    per_context = many.get("per_context") or []
    items = [
        f"{fmt_num(many.get('n_draws'))} draws of {many.get('sample_intervention')} per context"
        + (f" at position {position}" if position is not None else ""),
        f"z of the SAE's KL against the draws: mean {fmt_fixed(many.get('z_mean'), 2)}, "
        f"median {fmt_fixed(many.get('z_median'), 2)}",
        f"fraction of contexts with z > 2: {fmt_fixed(many.get('frac_z_above_2'))}",
        f"mean percentile of the SAE's KL among the draws: {fmt_num(many.get('percentile_mean'))}",
    ]
    rows = [[fmt_num(c.get("context")), fmt_num(c.get("sae_kl")), fmt_num(c.get("draw_mean")),
             fmt_num(c.get("draw_std")), fmt_fixed(c.get("z"), 2), fmt_num(c.get("percentile"))]
            for c in per_context[:N_TOP_ROWS]]
    blocks: list[Block] = [Heading(2, "Many samples"), Bullets(items)]
    if rows:
        blocks += [Para(f"First {len(rows)} of {len(per_context)} contexts:"),
                   Table(["context", "sae KL", "draws mean", "draws sd", "z", "percentile"], rows)]
    return blocks


def curve_blocks(curve: Mapping[str, Any] | None, label: str = "") -> list[Block]:
    """The robustness curve as a table: KL of cosine-matched noise per cosine, the SAE's point, the matching cos."""
    if not curve:
        return []
    rows = [[fmt_fixed(p.get("cos")), fmt_fixed(p.get("norm_frac"), 2), fmt_num(p.get("kl_mean")),
             f"[{fmt_num(p.get('kl_ci_low'))}, {fmt_num(p.get('kl_ci_high'))}]", fmt_num(p.get("ce_delta_mean"))]
            for p in sorted(curve.get("points", []), key=lambda p: (p.get("norm_frac"), p.get("cos")))]
    blocks: list[Block] = [Heading(2, f"Robustness curve{f' — {label}' if label else ''}"),
                           Para("Mean KL of cosine_matched noise (random x' at the given cos(x, x') and norm "
                                "norm_frac·‖x‖), with 95% intervals that resample contexts."),
                           Table(["cos", "norm frac", "KL mean", "95% CI", "ΔCE mean"], rows)]
    sae = curve.get("sae")
    if sae:
        items = [f"SAE: mean cos(x, x̂) {fmt_fixed(sae.get('cos_mean'))}, mean ‖x̂‖/‖x‖ "
                 f"{fmt_fixed(sae.get('norm_frac_mean'))}, mean KL {fmt_num(sae.get('kl_mean'))}"]
        for frac, cos in (curve.get("sae_equivalent_cos") or {}).items():
            items.append(f"at norm {frac}·‖x‖, noise does the SAE's damage at cos {fmt_fixed(cos)}" if cos is not None
                         else f"at norm {frac}·‖x‖, the SAE's KL lies outside the curve's range")
        blocks.append(Bullets(items))
    return blocks


CAPTIONS = {
    "kl_bars": "Mean per-token KL for each intervention{error}.",
    "kl_hist": "Distribution of per-token KL on a log axis (log-spaced bins, density per decade) for the SAE "
               "reconstruction and epsilon_random; other interventions as faint lines; dashed lines are means.",
    "kl_by_position": "Mean KL at each context position; bands are ±1.96·SE across contexts for sae and "
                      "epsilon_random.",
    "single_token": "Mean KL at offsets 0..k after patching only position t: offset 0 is the patched token, "
                    "later offsets show how the perturbation travels to later positions.",
    "many_samples": "Left: for the first contexts, the KL of random draws with the SAE's KL marked (red). "
                    "Right: the per-context z-scores of the SAE's KL against its draws.",
    "robustness": "Mean KL against the cosine similarity of the substitute; stars mark the SAE reconstructions.",
}


def caption_for(path: Path, report: Mapping[str, Any]) -> str:
    """A caption for a figure file, by its name."""
    template = CAPTIONS.get(path.stem)
    if template is None:
        return path.stem.replace("_", " ")
    error = " (error bars: ±1.96·SE of the per-context means)" if report.get("kind") != "study" else " per site/layer"
    return template.format(error=error)


def _overview(report: Mapping[str, Any]) -> list[Block]:
    if report.get("kind") == "study":
        runs = report.get("runs") or []
        return [Bullets([f"model: {report.get('model')}", f"mode: {report.get('mode')}",
                         f"runs: {', '.join(_site_layer(r) for r in runs) or DASH}"])]
    items = [
        f"model: {report.get('model')}",
        f"site: {_site_layer(report)} (hook {report.get('hook_name')})",
        f"mode: {report.get('mode')}",
        f"tokens: {fmt_num(report.get('n_tokens'))} in {fmt_num(report.get('n_contexts'))} contexts of "
        f"{fmt_num(report.get('context_len'))}",
        f"first position: {report.get('first_position', DASH)}",
        f"dataset: {report.get('dataset', DASH)}",
    ]
    if "centered_activations" in report:
        items.append(f"centred activations: {report['centered_activations']}")
    execution = report.get("execution") or {}
    if execution.get("path"):
        items.append(f"execution: {execution['path']}")
    return [Bullets(items)]


def _notes(report: Mapping[str, Any]) -> list[Block]:
    notes = report.get("notes")
    if report.get("kind") == "study":
        notes = [f"{_site_layer(r)}: {n}" for r in report.get("runs") or [] for n in r.get("notes") or []]
    if isinstance(notes, str):
        notes = [notes]
    return [Heading(2, "Notes"), Bullets([str(n) for n in notes]) if notes else Para("None.")]


def _figures(report: Mapping[str, Any], figures: Sequence[Path]) -> list[Block]:
    if not figures:
        return []
    return [Heading(2, "Figures"), *[Figure(Path(f), caption_for(Path(f), report)) for f in figures]]


def _provenance(report: Mapping[str, Any]) -> list[Block]:
    prov = report.get("provenance") or {}
    items = [
        f"klgap {prov.get('klgap_version', DASH)}, git {prov.get('git_hash') or DASH}",
        f"Python {prov.get('python', DASH)} on {prov.get('platform', DASH)}",
        f"created: {prov.get('created_at', DASH)}",
    ]
    if report.get("kind") != "study":
        items += [f"seed: {report.get('seed')}", f"device: {report.get('device')}, dtype: {report.get('dtype')}"]
    blocks: list[Block] = [Heading(2, "Provenance"), Bullets(items)]
    packages = prov.get("packages") or {}
    if packages:
        blocks.append(Table(["package", "version"], [[k, str(v) if v is not None else DASH] for k, v in packages.items()]))
    plugins = report.get("plugins") or {}
    if plugins:
        blocks.append(Table(["used", "plugin", "version"],
                            [[k, str(p.get("plugin")), str(p.get("version") or DASH)] for k, p in plugins.items()]))
    blocks += [Para("Configuration:"), Code(json.dumps(report.get("config") or {}, indent=2, default=str), "json")]
    return blocks


def title_of(report: Mapping[str, Any]) -> str:
    if report.get("kind") == "study":
        return f"klgap study: {report.get('model')} · {report.get('mode')}"
    return f"klgap report: {report.get('model')} · {report.get('hook_name') or _site_layer(report)} · {report.get('mode')}"


def document(report: Mapping[str, Any], figures: Sequence[Path]) -> list[Block]:
    """The report as blocks, in reading order."""
    blocks: list[Block] = [Heading(1, title_of(report)), *_overview(report), *_notes(report), *_summary(report)]
    if report.get("kind") != "study":
        blocks += [*_comparisons(report), *_interventions(report), *_sae(report), *_single_token(report),
                   *_many_samples(report), *_gap(report), *curve_blocks(report.get("curve"))]
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


def render_markdown(report: Mapping[str, Any], figures: Sequence[Path]) -> str:
    """report.md: figures are linked by file name (they lie beside the report)."""
    return "\n\n".join(_md_block(b) for b in document(report, figures)) + "\n"


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


def render_html(report: Mapping[str, Any], figures: Sequence[Path]) -> str:
    """report.html: one self-contained page (inline CSS, PNGs as data URIs, no scripts, no external assets)."""
    body = "\n".join(_html_block(b) for b in document(report, figures))
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
    from klgap.schema import load_report

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    written: dict[str, Path] = {}
    if report.get("kind") == "study":  # each site/layer's own figures and pages, then the study's
        for run in report.get("runs", []):
            sub = run_dir / run["path"]
            if (sub / "report.json").is_file() and (sub / "tokens.parquet").is_file():
                written.update({f"{run['path']}/{name}": path for name, path in rebuild(sub).items()})
    tokens = read_tokens(run_dir) if report.get("kind") != "study" else None
    figures = figures_for_run(run_dir, report, tokens)
    written.update({f.name: f for f in figures})
    for name, text in (("report.md", render_markdown(report, figures)), ("report.html", render_html(report, figures))):
        atomic_write_bytes(run_dir / name, text.encode("utf-8"))
        written[name] = run_dir / name
    return written

