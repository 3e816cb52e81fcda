"""The committed SmolLM2 results are what the declared files produce, and the README's tables are those results."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[2] / "replications" / "smollm2-135m-offline"
MODES = ("all_tokens", "single_token", "many_samples")
# What a run records in its report from the declarative file (paths are expanded there, so they are left out).
DECLARED_KEYS = ("model", "mode", "interventions", "n_tokens", "context_len", "batch_size", "seed", "dataset")


def _report(mode: str) -> dict:
    return json.loads((FOLDER / "results" / mode / "report.json").read_text())


def _table(heading_start: str) -> dict[tuple[str, int], list[str]]:
    """The README table under the heading that starts with `heading_start`, keyed by (site, layer)."""
    text = (FOLDER / "README.md").read_text()
    section = text.split(f"\n## {heading_start}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| site")]
    table = {}
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[(cells[0], int(cells[1]))] = cells[2:]
    return table


def _close(printed: str, value: float) -> bool:
    """`printed` is `value` as the README rounds it (fixed decimals or 2 significant digits)."""
    decimals = len(printed.split("e")[0].split(".")[1]) if "." in printed.split("e")[0] else 0
    if "e" in printed:
        mantissa = float(printed.split("e")[0])
        return math.isclose(float(printed), value, rel_tol=0.51 * 10**-decimals / abs(mantissa))
    return abs(float(printed) - value) <= 0.51 * 10**-decimals


@pytest.mark.parametrize("mode", MODES)
def test_committed_results_come_from_the_declared_file(mode):
    declared = tomllib.loads((FOLDER / f"{mode}.toml").read_text())
    report = _report(mode)
    recorded = report["config"]
    for key in DECLARED_KEYS:
        if key in declared:
            assert recorded[key] == declared[key], (mode, key)
    declared_runs = sorted((s, int(layer)) for s in declared["site"].split(",") for layer in declared["layer"].split(","))
    assert sorted((run["site"], run["layer"]) for run in report["runs"]) == declared_runs


def test_all_token_scale_is_at_least_200k_tokens_per_site():
    for run in _report("all_tokens")["runs"]:
        assert run["n_tokens"] >= 200_000, run["path"]
        assert all(stats["n_nonfinite"] == 0 for stats in run["interventions"].values()), run["path"]


def _rows(heading_start: str, mode: str):
    """(run, its README cells) for every run of `mode`; the table has exactly the report's sites × layers."""
    table = _table(heading_start)
    runs = _report(mode)["runs"]
    assert set(table) == {(run["site"], run["layer"]) for run in runs}
    return [(run, table[(run["site"], run["layer"])]) for run in runs]


def _check_printed(printed: str, value: float, path: str) -> None:
    assert printed == "1" and value > 0.995 or _close(printed, value), (path, printed, value)


def _check_ratio_cell(cell: str, kl_ratio: dict, path: str) -> None:
    """`cell` is "ratio [low, high]" at two decimals."""
    printed = [float(v) for v in re.findall(r"[\d.]+", cell)]
    assert len(printed) == 3, (path, cell)
    for shown, value in zip(printed, (kl_ratio[k] for k in ("ratio", "ci_low", "ci_high"))):
        assert abs(shown - value) <= 0.0051, (path, shown, value)


def test_readme_all_token_table_is_the_committed_report():
    for run, cells in _rows("All-token results", "all_tokens"):
        training = run["sae"]["info"]["training"]
        kl = {name: stats["kl_mean"] for name, stats in run["interventions"].items()}
        eps = run["comparisons"]["epsilon_random"]
        ev_train, l0_train = cells[0].split(" / ")
        ce_sae, ce_eps = cells[6].split(" / ")
        expected = [
            (ev_train, training["explained_variance"]),
            (l0_train, training["l0_mean"]),
            (cells[1], run["sae_metrics"]["explained_variance"]),
            (cells[2], kl["sae"]),
            (cells[3], kl["epsilon_random"]),
            (cells[5], eps["wilcoxon_kl"]["p_holm"]),
            (ce_sae, run["interventions"]["sae"]["ce_delta_mean"]),
            (ce_eps, run["interventions"]["epsilon_random"]["ce_delta_mean"]),
            (cells[7], kl["sae_norm"]),
            (cells[8], kl["sae_norm_corrected"]),
            (cells[9], kl["theta_random"]),
        ]
        for printed, value in expected:
            _check_printed(printed, value, run["path"])
        _check_ratio_cell(cells[4], eps["kl_ratio"], run["path"])


def test_readme_single_token_table_is_the_committed_report():
    for run, cells in _rows("Single-token results", "single_token"):
        eps = run["comparisons"]["epsilon_random"]
        _check_ratio_cell(cells[6], eps["kl_ratio"], run["path"])
        _check_printed(cells[7], eps["wilcoxon_kl"]["p_holm"], run["path"])
