"""The command line end to end, as a user runs it: train-sae, then replicate, on each tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from klgap.cli import main


@pytest.mark.parametrize(
    "model,site,layer", [("tiny-gpt2", "mlp_out", 1), ("tiny-pythia", "attn_out", 0), ("tiny-llama", "resid_pre", 1)]
)
def test_train_sae_then_replicate(tmp_path, capsys, model, site, layer):
    sae_dir = tmp_path / "sae"
    assert main(["train-sae", "--model", model, "--site", site, "--layer", str(layer), "--tokens", "30000",
                 "--context-len", "64", "--steps", "400", "--l1", "2", "--out", str(sae_dir), "--quiet"]) == 0
    training = json.loads((sae_dir / "training.json").read_text())
    assert training["hook_name"] == f"blocks.{layer}.hook_{site}"
    assert training["explained_variance"] > 0.5

    out = tmp_path / "run"
    assert main(["replicate", "--model", model, "--sae", str(sae_dir), "--tokens", "1024", "--context-len", "64",
                 "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "KL(sae)/KL(epsilon_random) =" in printed
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["site"], report["layer"]) == (model, site, layer)
    assert report["schema_version"] == "0.1.0"
    assert report["n_tokens"] == 16 * 63 and report["n_contexts"] == 16
    assert set(report["interventions"]) == {
        "sae", "sae_norm_corrected", "sae_norm", "epsilon_random", "theta_random", "theta_random_xnorm"
    }
    for row in report["interventions"].values():
        assert row["kl_mean"] > 0 and row["n_tokens"] == 16 * 63
    ratio = report["comparisons"]["epsilon_random"]["kl_ratio"]
    assert ratio["ci_low"] <= ratio["ratio"] <= ratio["ci_high"]
    assert report["kl_ratio_sae_over_epsilon_random"] == ratio["ratio"]
    assert report["sae_metrics"]["explained_variance"] > 0.3
    assert report["comparisons"]["epsilon_random"]["wilcoxon_kl"]["p_holm"] >= report["comparisons"]["epsilon_random"]["wilcoxon_kl"]["p_value"]
    assert set(report["gap"]["spearman"]) == {"cos", "l0", "x_norm", "eps", "position"}
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == 6 * 16 * 63
    assert {"context", "position", "token_id", "intervention", "kl", "ce_delta", "eps", "cos", "x_norm",
            "x_hat_norm", "l0"} <= set(tokens.columns)
    sae_rows = tokens[tokens.intervention == "sae"]
    assert sae_rows.kl.astype(float).mean() == pytest.approx(report["interventions"]["sae"]["kl_mean"], rel=1e-9)


def test_plugins_command(capsys):
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    for name in ("hf_models", "tiny-gpt2", "smollm2-135m", "epsilon_random", "sae_lens_disk", "sample"):
        assert name in text
    assert main(["plugins", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    assert {"hf_models", "sae_loaders", "perturbations", "token_sources"} <= {i["name"] for i in infos}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["replicate", "--model", "tiny-gtp2", "--site", "mlp_out", "--layer", "0"], "unknown model 'tiny-gtp2' (did you mean 'tiny-gpt2'?)"),
        (["replicate", "--model", "tiny-gpt2", "--site", "mlp", "--layer", "0"], "unknown site 'mlp'"),
        (["replicate", "--model", "tiny-gpt2", "--mode", "all", "--site", "mlp_out", "--layer", "0"], "unknown mode 'all'"),
        (["replicate", "--model", "tiny-gpt2", "--tokens", "0", "--site", "mlp_out", "--layer", "0"], "--tokens must be an integer ≥ 1, got 0"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "/nonexistent/sae"], "'/nonexistent/sae'"),
        (["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--mode", "single_token",
          "--position", "30", "--k", "16", "--context-len", "40"], "needs context_len ≥ 47"),
    ],
)
def test_bad_input_one_line_no_traceback(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klgap: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_console_script_installed():
    exe = shutil.which("klgap") or str(Path(__file__).parents[2] / ".venv" / "bin" / "klgap")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip()
