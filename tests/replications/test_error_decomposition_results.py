"""replications/error-decomposition: the committed results come from its declared file, and the README's table holds
their numbers."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from klgap.report.schema import StudyReport
from klgap.report.read import load_report
from tests.close import is_printed

FOLDER = Path(__file__).resolve().parents[2] / "replications" / "error-decomposition"
DECLARED_KEYS = ("model", "mode", "interventions", "tokens", "fit_tokens", "context_len", "batch_size", "seed",
                 "dataset")

pytestmark = pytest.mark.skipif(not (FOLDER / "results" / "report.json").is_file(),
                                reason="replications/error-decomposition/results not committed")


def _study() -> StudyReport:
    study = load_report(FOLDER / "results")
    assert isinstance(study, StudyReport)
    return study


def _readme_rows() -> dict[tuple[str, int], list[str]]:
    """The README's results table (under '## Results'), keyed by (site, layer)."""
    section = (FOLDER / "README.md").read_text().split("\n## Results", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {(cells[0], int(cells[1])): cells[2:] for cells in rows}


def _first_number(cell: str) -> str:
    return re.match(r"-?[0-9.]+", cell).group(0)


def test_results_come_from_the_declared_file():
    declared = tomllib.loads((FOLDER / "all_tokens.toml").read_text())
    study = _study()
    for key in DECLARED_KEYS:
        assert study.config[key] == declared[key], key
    declared_cells = {(s, int(layer)) for s in declared["site"].split(",") for layer in declared["layer"].split(",")}
    assert {(run.site, run.layer) for run in study.runs} <= declared_cells
    for run in study.runs:
        found = run.error_decomposition
        assert found is not None and found.held_out and found.n_fit_tokens >= declared["fit_tokens"], run.path
        assert all(s.n_nonfinite == 0 for s in run.interventions.values()), run.path


def test_readme_table_is_the_committed_results():
    rows = _readme_rows()
    study = _study()
    assert set(rows) == {(run.site, run.layer) for run in study.runs}
    for run in study.runs:
        cells, found = rows[(run.site, run.layer)], run.error_decomposition
        parts = {p.kept: p for p in found.parts}
        values = [found.r2.mean, found.r2_centred, found.lin_norm_frac.mean, run.kl_ratio_sae_over_epsilon_random,
                  parts["nonlinear"].kl_ratio.ratio, parts["linear"].kl_ratio.ratio,
                  parts["nonlinear"].excess_left.ratio, parts["linear"].excess_left.ratio]
        assert len(cells) == len(values), run.path
        for cell, value in zip(cells, values, strict=True):
            if cell == "—":  # an excess share whose denominator's interval holds 0 is not printed
                continue
            assert value is not None and math.isfinite(value) and is_printed(_first_number(cell), value), (run.path, cell, value)
