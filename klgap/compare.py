"""`klgap compare RUN_DIR...`: several runs (models, sites, layers) side by side — one table, overlaid figures.

Reads each folder's report.json (a run, or a study whose sub-runs all enter); nothing is recomputed. Writes
compare.json (data), compare.csv (the table), compare.md, ratio_compare.png and, where runs hold robustness
curves, robustness_compare.png with every curve and each SAE's own point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from klgap.errors import KlgapError
from klgap.provenance import provenance
from klgap.rundir import atomic_write_bytes, atomic_write_json
from klgap.schema import SCHEMA_VERSION, load_report

BASELINE = "epsilon_random"
COLUMNS = ["label", "model", "site", "layer", "mode", "n_tokens", "kl_sae", "kl_epsilon_random", "ratio",
           "ratio_ci_low", "ratio_ci_high", "p_holm", "sae_cos", "sae_equivalent_cos", "path"]


def _entry(summary: dict[str, Any], model: str, mode: str, label: str, path: str) -> dict[str, Any]:
    kl = summary.get("interventions") or {}
    comp = (summary.get("comparisons") or {}).get(BASELINE) or {}
    ratio = comp.get("kl_ratio") or {}
    curve = summary.get("curve") or None
    equivalent = next(iter((curve or {}).get("sae_equivalent_cos", {}).values()), None) if curve else None
    return {
        "label": label, "model": model, "site": summary.get("site"), "layer": summary.get("layer"), "mode": mode,
        "n_tokens": summary.get("n_tokens"),
        "kl_sae": (kl.get("sae") or {}).get("kl_mean"), "kl_epsilon_random": (kl.get(BASELINE) or {}).get("kl_mean"),
        "ratio": ratio.get("ratio"), "ratio_ci_low": ratio.get("ci_low"), "ratio_ci_high": ratio.get("ci_high"),
        "p_holm": (comp.get("wilcoxon_kl") or {}).get("p_holm"),
        "sae_cos": (summary.get("sae_metrics") or {}).get("cos_mean"), "sae_equivalent_cos": equivalent,
        "path": path, "curve": curve,
    }


def entries_for(run_dir: str | Path, label: str | None = None) -> list[dict[str, Any]]:
    """One entry per measured site/layer in a run folder (a study folder gives one per sub-run)."""
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    model, mode = str(report.get("model")), str(report.get("mode"))
    runs = report["runs"] if report.get("kind") == "study" else [report]
    out = []
    for run in runs:
        where = f"{run.get('site')} L{run.get('layer')}"
        name = f"{label} {where}" if label and len(runs) > 1 else (label or f"{model} {where}")
        out.append(_entry(run, model, mode, name, str(run_dir / run["path"]) if "path" in run else str(run_dir)))
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    return [[e["label"], _fmt(e["kl_sae"]), _fmt(e["kl_epsilon_random"]),
             f"{_fmt(e['ratio'], 3)} [{_fmt(e['ratio_ci_low'], 3)}, {_fmt(e['ratio_ci_high'], 3)}]",
             _fmt(e["p_holm"], 3), _fmt(e["sae_cos"], 3), _fmt(e["sae_equivalent_cos"], 3)] for e in entries]


HEADER = ["run", "KL sae", "KL eps", "ratio [95% CI]", "p (Holm, within its report)", "SAE cos", "noise cos at SAE KL"]


def compare_runs(run_dirs: list[str], out: str | Path, labels: list[str] | None = None) -> dict[str, Any]:
    """Build the comparison of `run_dirs` into `out`; returns the data plus the table as text."""
    from klgap.plots import curves_of, ratio_bars, robustness_curve
    from klgap.render import Figure, Heading, Para, Table, _md_block

    if labels and len(labels) != len(run_dirs):
        raise KlgapError(f"--label was given {len(labels)} times for {len(run_dirs)} run folders; give one per folder")
    if len(run_dirs) < 1:
        raise KlgapError("klgap compare needs at least one RUN_DIR")
    entries = [e for i, d in enumerate(run_dirs) for e in entries_for(d, labels[i] if labels else None)]
    seen = [e["label"] for e in entries]
    dupes = sorted({x for x in seen if seen.count(x) > 1})
    if dupes:
        raise KlgapError(f"two runs share the label {dupes[0]!r}; give --label per RUN_DIR")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    data = {"schema_version": SCHEMA_VERSION, "kind": "compare", "runs": entries, "provenance": provenance()}
    atomic_write_json(out / "compare.json", data)
    frame = pd.DataFrame([{k: e[k] for k in COLUMNS} for e in entries], columns=COLUMNS)
    atomic_write_bytes(out / "compare.csv", frame.to_csv(index=False).encode("utf-8"))
    written += [out / "compare.json", out / "compare.csv"]
    figures = [ratio_bars(entries, out / "ratio_compare.png")]
    points, stars = curves_of((e["label"], e["curve"]) for e in entries)
    if points:
        figures.append(robustness_curve(points, out / "robustness_compare.png", stars,
                                        f"{len(points)} curves; stars: each SAE's (mean cos, mean KL)"))
    written += figures
    rows = table_rows(entries)
    blocks = [Heading(1, "klgap comparison"),
              Para(f"{len(entries)} runs from: {', '.join(str(d) for d in run_dirs)}. Ratios are KL(sae)/KL("
                   f"{BASELINE}) with 95% intervals that resample contexts; p is the Wilcoxon test of its own report, "
                   "Holm-corrected there. 'noise cos at SAE KL' is the cosine at which cosine-matched noise does "
                   "the SAE's damage (from the run's robustness curve)."),
              Table(HEADER, rows)]
    blocks += [Figure(f, f.stem.replace("_", " ")) for f in figures]
    atomic_write_bytes(out / "compare.md", ("\n\n".join(_md_block(b) for b in blocks) + "\n").encode("utf-8"))
    written.append(out / "compare.md")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [HEADER, *rows])
    return {"entries": entries, "written": written, "table_text": text}
