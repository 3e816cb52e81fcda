"""The committed compounding results (replications/compounding) are what joint.toml produces, and the README's
tables are those results, cell for cell."""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path

import pytest

from klgap.render.formatting import fmt, fmt_ci, fmt_p
from klgap.render.compounding_page import subset_table
from klgap.report.read import load_report
from tests.close import EXACT, assert_close_tree

FOLDER = Path(__file__).resolve().parents[2] / "replications" / "compounding"
RESULTS = FOLDER / "results"
LAYERS = (3, 10, 17, 24)
pytestmark = pytest.mark.skipif(not (RESULTS / "report.json").is_file(),
                                reason="replications/compounding/results is not committed yet (its README: Status)")
DECLARED_KEYS = ("model", "mode", "interventions", "tokens", "context_len", "batch_size", "seed", "joint",
                 "joint_subsets")


def _readme_rows(heading_start: str) -> list[list[str]]:
    """The body rows of the table in the README section whose heading starts with `heading_start`."""
    section = (FOLDER / "README.md").read_text().split(f"\n## {heading_start}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_committed_run_is_the_declared_file():
    declared = tomllib.loads((FOLDER / "joint.toml").read_text())
    report = json.loads((RESULTS / "report.json").read_text())
    for key in DECLARED_KEYS:
        assert report["config"][key] == declared[key], key
    assert [(s["site"], s["layer"]) for s in report["joint"]] == [("resid_post", layer) for layer in LAYERS]
    subsets = report["compounding"]["subsets"]
    names = [[f"blocks.{layer}.hook_resid_post" for layer in chosen]
             for size in (2, 3) for chosen in itertools.combinations(LAYERS, size)]
    assert [s["sites"] for s in subsets] == names  # every 2- and 3-layer subset, by size then forward order
    for subset in subsets:  # each subset's own report is the one the joint report lists
        alone = json.loads((RESULTS / subset["path"] / "report.json").read_text())
        assert_close_tree(alone["compounding"], subset["compounding"], (subset["path"], "compounding"), EXACT)
        assert alone["n_tokens"] == report["n_tokens"]
    for site in report["compounding"]["sites"]:
        alone = json.loads((RESULTS / site["path"] / "report.json").read_text())
        assert_close_tree(alone["interventions"]["sae"]["kl_mean"], site["kl_mean"]["sae"], (site["path"], "kl_mean"), EXACT)
        assert all(stats["n_nonfinite"] == 0 for stats in alone["interventions"].values())


def test_readme_subset_table_is_the_report():
    _, rows = subset_table(load_report(RESULTS).compounding)
    assert _readme_rows("Every subset") == rows


def test_readme_additivity_table_is_the_report():
    found = load_report(RESULTS).compounding
    rows = [[name, fmt(a.joint_kl_mean), fmt(a.sum_single_kl_mean),
             fmt_ci(a.joint_over_sum.ratio, a.joint_over_sum.ci_low, a.joint_over_sum.ci_high),
             fmt_p(a.wilcoxon_joint_vs_sum.p_value), a.verdict] for name, a in found.additivity.items()]
    assert _readme_rows("All four layers") == rows


def test_readme_single_layer_table_is_the_report():
    found = load_report(RESULTS).compounding
    rows = [[site.hook_name, fmt_ci(site.kl_ratio.ratio, site.kl_ratio.ci_low, site.kl_ratio.ci_high),
             *(fmt(site.kl_mean[name]) for name in found.additivity)] for site in found.sites]
    assert _readme_rows("Each layer alone") == rows
