"""The committed part of the baselines replication (replications/baselines/results/smollm2-resid) is what
smollm2-resid.toml declares, and the README's tables and kl_div_scores are those results, cell for cell."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from klgap.render.formatting import fmt
from klgap.report.read import load_report

FOLDER = Path(__file__).resolve().parents[2] / "replications" / "baselines"
RESULTS = FOLDER / "results" / "smollm2-resid"
DECLARED_KEYS = ("model", "mode", "interventions", "tokens", "context_len", "batch_size", "seed", "fit_tokens",
                 "dataset", "mask_special")
pytestmark = pytest.mark.skipif(not (RESULTS / "report.json").is_file(), reason="no committed baselines results")


def _tables():
    spec = importlib.util.spec_from_file_location("baselines_tables", FOLDER / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_study_is_the_declared_file():
    declared = tomllib.loads((FOLDER / "smollm2-resid.toml").read_text())
    declared.setdefault("mask_special", "all")  # the default since issue 30
    report = json.loads((RESULTS / "report.json").read_text())
    for key in DECLARED_KEYS:
        assert report["config"][key] == declared[key], key
    assert [(run["site"], run["layer"]) for run in report["runs"]] == [("resid_post", 3), ("resid_post", 10),
                                                                      ("resid_post", 17)]
    for run in report["runs"]:  # each site's own report is the one the study lists, measured on the same tokens
        alone = json.loads((RESULTS / run["path"] / "report.json").read_text())
        assert alone["n_tokens"] == report["runs"][0]["n_tokens"] == 32 * 127 - 23  # less the separators masked
        assert all(stats["n_nonfinite"] == 0 for stats in alone["interventions"].values())


def test_readme_tables_are_the_committed_results():
    """The panel, fit and matched-size tables in the README's Results section are tables.py's on results/."""
    printed = [block.strip() for block in "\n".join(_tables().battery_tables(RESULTS)).split("\n\n") if block.startswith("|")]
    results = (FOLDER / "README.md").read_text().split("\n## Results", 1)[1].split("\n## ", 1)[0]
    in_readme = [block.strip() for block in results.split("\n\n") if block.startswith("|")]
    assert len(printed) == 3 and in_readme == printed


def test_readme_kl_div_scores_are_the_reports():
    scores = []
    for layer in (3, 10, 17):
        found = load_report(RESULTS / f"resid_post_L{layer:02d}").sae_lens_scores
        low, high = found.kl_div_score_ci
        scores.append(f"{fmt(found.kl_div_score, 3)} [{fmt(low, 3)}, {fmt(high, 3)}]")
    assert f"kl_div_score (sae_lens's definition): {scores[0]}, {scores[1]}, {scores[2]} at layers 3," in \
        (FOLDER / "README.md").read_text()
