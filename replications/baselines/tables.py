"""Print the README's tables (markdown) from the folders the baselines replication writes, e.g.

    .venv/bin/python replications/baselines/tables.py runs/baselines-smollm2-135m [runs/baselines-smollm2-135m-sweep]

Each folder is a study (several sites/layers) or a run. For the battery (smollm2.toml, gemma3.toml): the opening
sentence per site/layer, the baseline panel (site/layer × baseline: KL(sae)/KL(baseline) [95% CI] and the verdict),
what each fit found on the held-out fit tokens (the covariance's top eigenvalue share, PCA's k, the random
dictionary's explained variance beside the SAE's, ‖ē‖/‖e‖), and the ratio over epsilon_random in bins of ε/‖x‖. For a
length sweep (sweep.toml): each direction's plateau width and SAE-equivalent length per site/layer. Every number is
read from the reports (klgap/report/panel.py, klgap/report/size_bins.py, klgap/report/sweep.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from klgap.render.formatting import DASH, fmt, fmt_fixed  # noqa: E402
from klgap.render.panel_page import panel_matrix, panels, size_matrix  # noqa: E402
from klgap.render.sweep_page import plateau_text  # noqa: E402
from klgap.report.panel import opening_sentence  # noqa: E402
from klgap.report.read import load_report  # noqa: E402
from klgap.report.schema import Report, StudyReport  # noqa: E402

#: (fitted intervention, key of its fit summary, column header) for the fit table
FIT_COLUMNS = (
    ("cov_random_mixture", "top_eigenvalue_share", "top eigenvalue share of Σ"),
    ("epsilon_error_cov", "top_eigenvalue_share", "top eigenvalue share of Σ_e"),
    ("epsilon_mahalanobis", "condition_number", "cond(Σ + λI)"),
    ("pca_matched", "k", "PCA k"),
    ("pca_matched", "ev_pca", "PCA EV"),
    ("random_dictionary", "n_atoms", "random dict. atoms"),
    ("random_dictionary", "ev_random_dictionary", "random dict. EV"),
    ("sae_minus_offset", "error_offset_frac", "‖ē‖/‖e‖"),
)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def runs_of(folder: Path) -> list[tuple[str, Report]]:
    """(site/layer, run report) of a study's sub-runs (each its own report.json, with its execution record), or of a
    run folder."""
    report = load_report(folder)
    if isinstance(report, StudyReport):
        return [(f"{run.site} L{run.layer}", load_report(folder / run.path)) for run in report.runs]
    return [(f"{report.site} L{report.layer}", report)]


def fit_value(report: Report, name: str, key: str) -> str:
    found = report.execution.get("fitted", {}).get(name, {})  # execution is free-form: what the engine recorded
    value = found.get(key)
    if value is None:
        return DASH
    text = str(value) if isinstance(value, int) else fmt(value, 3)
    return text + (" (nearly degenerate)" if key == "top_eigenvalue_share" and value > 0.5 else "")


def battery_tables(folder: Path) -> list[str]:
    runs = runs_of(folder)
    out = ["Opening sentences:", "", *[f"- {opening_sentence(r, r.model, r.mode)}" for _, r in runs], ""]
    entries = [(label, panel) for label, report in runs for _, panel in panels(report)]
    if entries:
        table = panel_matrix(entries)
        out += [markdown(table.header, table.rows), ""]
    fits = [[label, fmt_fixed(r.sae_metrics.explained_variance), fmt(r.sae_metrics.l0_mean, 3),
             *(fit_value(r, name, key) for name, key, _ in FIT_COLUMNS)] for label, r in runs]
    out += [markdown(["site/layer", "SAE EV", "SAE L0", *(h for _, _, h in FIT_COLUMNS)], fits), ""]
    bins = [(label, r.size_bins) for label, r in runs if r.size_bins is not None and r.size_bins.bins]
    if bins:
        table = size_matrix(bins)
        out += [markdown(table.header, table.rows), ""]
    return out


def sweep_tables(folder: Path) -> list[str]:
    runs = [(label, r) for label, r in runs_of(folder) if r.sweep is not None]
    if not runs:
        return []
    directions = list(dict.fromkeys(d.direction for _, r in runs for d in r.sweep.directions))
    rows = []
    for label, r in runs:
        found = {d.direction: d for d in r.sweep.directions}
        rows.append([label, fmt(r.sweep.threshold_kl),
                     *(f"{plateau_text(found[n])}; SAE-equiv. t {fmt_fixed(found[n].sae_equivalent_t)}" if n in found
                       else DASH for n in directions)])
    return [markdown(["site/layer", "threshold KL (0.1× SAE)", *(f"along {n}" for n in directions)], rows), ""]


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        print(f"## {folder}\n")
        report = load_report(folder)
        runs = report.runs if isinstance(report, StudyReport) else [report]
        if any(run.sweep is not None for run in runs):
            print("\n".join(sweep_tables(folder)))
        else:
            print("\n".join(battery_tables(folder)))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: tables.py RUN_OR_STUDY_FOLDER [...]")
    main(sys.argv[1:])
