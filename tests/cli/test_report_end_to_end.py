"""A real engine run in every mode, then `klgap report`: figures, report.md and report.html from saved data."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from klgap.cli.main import main
from klgap.plan.config import RunConfig
from klgap.report.schema import as_json
from klgap.plan.sites import hook_name
from tests.helpers import random_sae, run_config

EXPECTED = {
    "all_tokens": {"kl_bars.png", "kl_hist.png", "kl_by_position.png"},
    "single_token": {"kl_bars.png", "single_token.png"},
    "many_samples": {"kl_bars.png", "many_samples.png"},
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_engine_then_report(tmp_path, capsys, load_model, mode):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, hook_name("mlp_out", 1))
    cfg = RunConfig(model="tiny-gpt2", sae=str(sae), dataset="random", tokens=6 * 32, context_len=32, device="cpu",
                    mode=mode, position=5, k=4, n_samples=10, interventions=["sae", "epsilon_random", "theta_random"])
    report = run_config(cfg, tmp_path / "run", progress=False)
    assert main(["report", str(tmp_path / "run")]) == 0
    assert main(["validate", str(tmp_path / "run")]) == 0  # a fresh report's values pass klgap's own checks
    written = {line.split("/")[-1] for line in capsys.readouterr().out.split()}
    assert EXPECTED[mode] | {"report.md", "report.html"} <= written
    for name in EXPECTED[mode]:
        data = (tmp_path / "run" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert mpimg.imread(tmp_path / "run" / name).ndim == 3
    md = (tmp_path / "run" / "report.md").read_text()
    ratio = report.comparisons["epsilon_random"].kl_ratio
    assert f"{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]" in md
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= len(EXPECTED[mode]) and "<script" not in page
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == as_json(report)  # the data is untouched
