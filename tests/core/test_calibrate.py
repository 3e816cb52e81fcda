"""klgap calibrate (issue 37 item 3, first part): the planted-truth testbed's geometry holds (an error orthogonal to
every feature moves nothing, an aligned one moves the read-offs), and its table runs through the CLI."""

from __future__ import annotations

import json

import torch

from klgap.calibrate.testbed import Settings, kl, planted, run_seed, synthetic
from klgap.cli.main import main

SMALL = Settings(tokens=512, n_boot=200)


def test_the_testbed_knows_where_the_model_is_sensitive():
    x, fit, readout = synthetic(SMALL, 0)
    torch.testing.assert_close(readout.features @ readout.features.T, torch.eye(SMALL.n_features, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    size = SMALL.error_frac * x.norm(dim=-1, keepdim=True)
    orthogonal = planted("orthogonal", x, readout, gen)
    assert float((orthogonal @ readout.features.T).abs().max()) < 1e-10
    assert float(kl(readout, x, x + size * orthogonal).max()) < 1e-12
    aligned = kl(readout, x, x + size * planted("aligned", x, readout, gen)).mean()
    random = kl(readout, x, x + size * planted("random", x, readout, gen)).mean()
    assert float(aligned) > 3 * float(random) > 0


def test_every_baseline_calls_the_aligned_error_pathological_and_the_orthogonal_one_benign_or_undecided():
    found, facts = run_seed(SMALL, 1)
    assert facts is None  # no SAE trained (sae_samples 0)
    calls = {(c.geometry, c.baseline): c for c in found}
    assert {c.verdict for (g, _), c in calls.items() if g == "aligned"} == {"pathological"}
    assert calls["orthogonal", "isotropic"].verdict == "benign" and calls["orthogonal", "isotropic"].ratio < 1e-10


def test_calibrate_through_the_cli(tmp_path, capsys):
    out = tmp_path / "cal"
    assert main(["calibrate", "--seeds", "2", "--tokens", "256", "--sae-samples", "20000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| isotropic |" in printed and "false-positive rate" in printed
    found = json.loads((out / "calibration.json").read_text())
    assert found["seeds"] == [0, 1] and len(found["rows"]) == 12 and len(found["saes"]) == 2
    assert all(0 < s["error_in_feature_span"] <= 1 + 1e-9 for s in found["saes"])
    assert "Each baseline on the SAE's own error" in printed
    row = next(r for r in found["rows"] if r["geometry"] == "aligned" and r["baseline"] == "isotropic")
    assert row["pathological"] == 1.0 and row["median_ratio"] > 1
    assert main(["calibrate", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("klgap: error: --seeds must be ≥ 1")
