"""The committed over-training replication (replications/sae-training): its results come from its declared file,
its recipe is the offline replication's at a declared scale, and its README's table is the committed report."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from klgap.report.schema import StudyReport
from klgap.report.read import load_report
from klgap.report.validate import validate_file
from tests.close import Tolerance, assert_close_tree, is_printed

FOLDER = Path(__file__).resolve().parents[2] / "replications" / "sae-training"
OFFLINE = FOLDER.parent / "smollm2-135m-offline" / "all_tokens.toml"
RESULTS = FOLDER / "results"

pytestmark = pytest.mark.skipif(not (RESULTS / "report.json").is_file(), reason="no committed results yet")


def _declared() -> dict:
    return tomllib.loads((FOLDER / "all_tokens.toml").read_text())


def test_the_recipe_is_the_offline_one_at_a_tenth_of_its_tokens_and_steps():
    ours, offline = _declared()["train_sae"], tomllib.loads(OFFLINE.read_text())["train_sae"]
    for key in ("l1", "expansion", "dataset", "seed"):
        assert ours[key] == offline[key], key
    assert ours["tokens"] * 10 == offline["tokens"] and ours["steps"] * 10 == offline["steps"]
    mlp, offline_mlp = ours["sites"]["mlp_out_L17"], offline["sites"]["mlp_out_L17"]
    assert mlp["l1"] == offline_mlp["l1"] and mlp["steps"] * 10 == offline_mlp["steps"]
    assert "smollm2-135m-checkpoints" in _declared()["checkpoints"]  # its own folder, not the offline SAEs'


def test_committed_results_are_the_declared_study_over_ten_checkpoints_per_sae():
    declared = _declared()
    validate_file(RESULTS / "report.json")
    study = load_report(RESULTS)
    assert isinstance(study, StudyReport) and study.over_training is not None
    for key in ("model", "mode", "interventions", "tokens", "context_len", "batch_size", "seed", "dataset"):
        assert study.config[key] == declared[key], key
    assert [(c.site, c.layer) for c in study.over_training] == [("resid_post", 17), ("mlp_out", 17)]
    for curve in study.over_training:
        assert len(curve.points) == declared["train_sae"]["checkpoints"]
        steps = [p.step for p in curve.points]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        for point in curve.points:
            sub = load_report(RESULTS / point.path)
            # two computations of one mean (the point's from per-context sums): 3.9e-8 apart at most in these results
            assert_close_tree(sub.interventions["sae"].kl_mean, point.kl_sae.mean, (point.path, "kl_sae"), Tolerance(rel=1e-6))
            assert sub.sae.info["training"]["step"] == point.step


def test_readme_table_is_the_committed_report():
    study = load_report(RESULTS)
    section = (FOLDER / "README.md").read_text().split("\n## Results", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    body = [r for r in rows if r[0] in ("resid_post", "mlp_out")]
    points = [(c.site, p) for c in study.over_training for p in c.points]
    assert len(body) == len(points)
    for cells, (site, point) in zip(body, points, strict=True):
        assert cells[0] == site and int(cells[1]) == point.step
        assert is_printed(cells[3], point.explained_variance), (site, point.step, cells[3])
        assert is_printed(cells[7].split()[0], point.kl_ratio.ratio), (site, point.step, cells[7])
