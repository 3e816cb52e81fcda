"""`klgap compare RUN_DIR...`: several runs (models, sites, layers) side by side — one table, overlaid figures.

Reads each folder's report.json (a run, or a study whose sub-runs all enter); nothing is recomputed. Writes
compare.json (data), compare.csv (the table), compare.md, ratio_compare.png and, where runs hold robustness
curves, robustness_compare.png with every curve and each SAE's own point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from klgap.errors import KlgapError
from klgap.render.formatting import fmt, fmt_fixed
from klgap.report.provenance import provenance
from klgap.job.folder import atomic_write_bytes, atomic_write_json
from klgap.report.panel import Panel, baseline_panel
from klgap.report.read import load_report
from klgap.report.schema import BASELINE, SCHEMA_VERSION, Curve, SiteSummary, SizeBins, StudyReport, as_json
from klgap.report.summary import SummaryRow, summary_row

COLUMNS = ["label", "model", "site", "layer", "mode", "n_tokens", "kl_sae", f"kl_{BASELINE}", "ratio",
           "ratio_ci_low", "ratio_ci_high", "p_holm", "sae_cos", "sae_equivalent_cos", "path", "p_value", "holm_family",
           "explained_variance", "l0_mean", "kl_div_score", "ce_loss_score", "ce_clean", "quality_notes"]
HEADER = ["run", "KL sae", "KL eps", "ratio [95% CI]", "Wilcoxon p", "explained variance", "L0", "SAE cos",
          "noise cos at SAE KL"]


@dataclass(frozen=True)
class Entry:
    """One measured site/layer of a compared folder: its label, its folder, its summary row, its curve."""

    label: str
    path: str
    row: SummaryRow
    curve: Curve | None
    panel: Panel | None = None  # the SAE against every baseline the run measured (klgap/report/panel.py)
    size_bins: SizeBins | None = None  # the ratio at matched ε/‖x‖ (klgap/report/size_bins.py)
    notes: tuple[str, ...] = ()  # the SAE's quality notes (klgap/report/quality.py)

    def record(self) -> dict[str, Any]:
        """compare.json's entry (compare.csv's columns, then the curve)."""
        row, quality = self.row, self.row.quality
        values = [self.label, row.model, row.site, row.layer, row.mode, row.n_tokens, row.kl_sae, row.kl_baseline,
                  row.ratio, row.ratio_ci_low, row.ratio_ci_high, row.p_holm, row.sae_cos, row.sae_equivalent_cos,
                  self.path, row.p_value, row.holm_family,
                  quality.explained_variance if quality else None, quality.l0_mean if quality else None,
                  quality.kl_div_score if quality else None, quality.ce_loss_score if quality else None,
                  quality.ce_clean if quality else None, list(self.notes)]
        return {**dict(zip(COLUMNS, values, strict=True)), "curve": as_json(self.curve) if self.curve is not None else None}

    def cells(self) -> list[str]:
        """The row of compare.md and of the terminal table (HEADER)."""
        row = self.row
        quality = row.quality
        return [self.label, fmt(row.kl_sae), fmt(row.kl_baseline), row.ratio_text(), row.p_text(),
                fmt_fixed(quality.explained_variance if quality else None), fmt(quality.l0_mean if quality else None, 3),
                fmt_fixed(row.sae_cos), fmt_fixed(row.sae_equivalent_cos)]


def entries_for(run_dir: str | Path, label: str | None = None) -> list[Entry]:
    """One entry per measured site/layer in a run folder (a study folder gives one per sub-run)."""
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    runs = report.runs if isinstance(report, StudyReport) else [report]
    out = []
    for run in runs:
        path = run_dir / run.path if isinstance(report, StudyReport) else run_dir
        out.append(entry_of(run, report.model, report.mode, str(path), label, several=len(runs) > 1))
    seen = [e.label for e in out]  # several SAEs of one site (seeds, checkpoints): their folders tell them apart
    return [replace(e, label=f"{e.label} ({run.path})") if seen.count(e.label) > 1 else e
            for e, run in zip(out, runs, strict=True)]


def groups_for(run_dir: str | Path, label: str | None = None) -> list[dict[str, Any]]:
    """A study folder's SAEs of one site that differ in seed or architecture only (klgap/report/between_saes.py),
    each labelled as its folder's entries are ('LABEL mlp_out L3' or 'MODEL mlp_out L3'): compare.json's
    ``between_saes``."""
    report = load_report(Path(run_dir))
    if not isinstance(report, StudyReport):
        return []
    return [{"label": f"{label} {g.site} L{g.layer}" if label else f"{report.model} {g.site} L{g.layer}",
             **as_json(g)} for g in report.between_saes or []]


def entry_of(run: SiteSummary, model: str, mode: str, path: str, label: str | None = None,
             several: bool = False) -> Entry:
    """The entry of one measured site/layer (a run report, or one run of a study, whose model and mode it holds):
    labelled `label` ('LABEL mlp_out L3' among `several` of one folder), else 'MODEL mlp_out L3'."""
    row = summary_row(run, model, mode)
    name = f"{label} {row.where}" if label and several else (label or f"{model} {row.where}")
    return Entry(name, path, row, run.curve, baseline_panel(run, model, mode),
                 run.size_bins, tuple(note.text for note in run.quality_notes))


def compare_runs(run_dirs: list[str], out: str | Path, labels: list[str] | None = None) -> dict[str, Any]:
    """Build the comparison of `run_dirs` into `out`; returns the entries, the files written, the table as text and
    the baseline panel's matrix as text ('' when no run says which of its interventions are baselines)."""
    from klgap.figures.curves import curves_of, ratio_bars, robustness_curve, runs_title
    from klgap.render.blocks import Bullets, Figure, Heading, Para, Table, md_block, text_table
    from klgap.render.panel_page import comparison_blocks, matrix_text
    from klgap.report.findings import compare_finding

    if labels and len(labels) != len(run_dirs):
        raise KlgapError(f"--label was given {len(labels)} times for {len(run_dirs)} run folders; give one per folder")
    if len(run_dirs) < 1:
        raise KlgapError("klgap compare needs at least one RUN_DIR")
    entries = [e for i, d in enumerate(run_dirs) for e in entries_for(d, labels[i] if labels else None)]
    if not labels and len({e.row.mode for e in entries}) > 1:  # runs of several modes: the mode tells them apart
        entries = [replace(e, label=f"{e.label} {e.row.mode}") for e in entries]
    seen = [e.label for e in entries]
    dupes = sorted({x for x in seen if seen.count(x) > 1})
    if dupes:
        raise KlgapError(f"two runs share the label {dupes[0]!r}; give --label per RUN_DIR")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    records = [e.record() for e in entries]
    groups = [g for i, d in enumerate(run_dirs) for g in groups_for(d, labels[i] if labels else None)]
    data = {"schema_version": SCHEMA_VERSION, "kind": "compare", "runs": records, "between_saes": groups,
            "provenance": provenance()}
    atomic_write_json(out / "compare.json", data)
    frame = pd.DataFrame([{k: r[k] for k in COLUMNS} for r in records], columns=COLUMNS)
    frame["quality_notes"] = frame["quality_notes"].map("; ".join)
    atomic_write_bytes(out / "compare.csv", frame.to_csv(index=False).encode("utf-8"))
    written += [out / "compare.json", out / "compare.csv"]
    figures = [ratio_bars([(e.label, e.row) for e in entries], out / "ratio_compare.png")]
    points, stars = curves_of((e.label, e.curve) for e in entries)
    if points:
        figures.append(robustness_curve(points, out / "robustness_compare.png", stars,
                                        runs_title([e.row for e in entries if e.curve is not None])))
    written += figures
    rows = [e.cells() for e in entries]
    blocks = [Heading(1, "klgap comparison"), Para(compare_finding([e.row for e in entries]), lead=True),
              Para(f"{len(entries)} runs from: {', '.join(str(d) for d in run_dirs)}. Ratios are KL(sae)/KL("
                   f"{BASELINE}) with 95% intervals that resample contexts; p is the Wilcoxon test of its own report, "
                   "with its Holm correction there (in parentheses, where its family holds more than one test). "
                   "'noise cos at SAE KL' is the cosine at which cosine-matched noise does "
                   "the SAE's damage (from the run's robustness curve)."),
              Table(HEADER, rows)]
    notes = [f"{e.label}: {text}" for e in entries for text in e.notes]
    if notes:  # each SAE's quality notes (klgap/report/quality.py)
        blocks += [Para("Quality notes (a ratio above is about the SAE as it is):"), Bullets(notes)]
    spread = [f"{g['label']}: {g['finding']}" for g in groups]
    if spread:  # seeds of one recipe: the recipe's ratio over seeds and contexts, and the spread between seeds
        blocks += [Para("Between SAEs (each study's SAEs of one site that differ in seed or architecture only):"),
                   Bullets(spread)]
    families = list(dict.fromkeys(e.row.holm_family for e in entries if e.row.holm_family is not None))
    if families:
        blocks += [Para("Holm families (each as its own report corrected it):"), Bullets(families)]
    labelled = [(e.label, e.panel, e.size_bins) for e in entries]
    blocks += comparison_blocks(labelled)  # every baseline each run measured; the ratio at matched ε/‖x‖
    panel_text = matrix_text(labelled)
    blocks += [Figure(f, f.stem.replace("_", " ")) for f in figures]
    atomic_write_bytes(out / "compare.md", ("\n\n".join(md_block(b) for b in blocks) + "\n").encode("utf-8"))
    written.append(out / "compare.md")
    table_text = "\n".join([text_table(HEADER, rows), *(f"quality note: {note}" for note in notes),
                            *(f"between SAEs: {line}" for line in spread)])
    return {"entries": entries, "written": written, "table_text": table_text, "panel_text": panel_text}
