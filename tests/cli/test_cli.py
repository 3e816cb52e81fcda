"""The command line end to end, as a user runs it: train-sae, then replicate, on each tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from klgap.cli.main import main
from klgap.report.schema import SCHEMA_VERSION


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
    from klgap.report.panel import opening_sentence
    from klgap.report.read import load_report

    found = load_report(out)  # the report's opening sentence is printed (each baseline, the SAE's EV and L0)
    assert opening_sentence(found, found.model, found.mode) in printed and "explained variance" in printed
    report = json.loads((out / "report.json").read_text())
    assert (report["model"], report["site"], report["layer"]) == (model, site, layer)
    assert report["schema_version"] == SCHEMA_VERSION
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


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files for the bad-input table: an SAE for tiny-gpt2 mlp_out L0, a wrong-width one, bad text files."""
    from tests.helpers import random_sae

    root = tmp_path_factory.mktemp("bad")
    random_sae(root / "sae.safetensors", 64, 128, "blocks.0.hook_mlp_out")
    random_sae(root / "wide.safetensors", 96, 128, "blocks.0.hook_mlp_out")
    random_sae(root / "nohook.safetensors", 64, 128, None)
    (root / "trunc.safetensors").write_bytes((root / "sae.safetensors").read_bytes()[:300])
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1") * 100)
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return root


SAE = "{root}/sae.safetensors"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--interventions", "sae,epsilon_randm"], "unknown perturbation 'epsilon_randm' (did you mean 'epsilon_random'?)"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--dataset", "wikitext"], "unknown token source 'wikitext'"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--layer", "5"], "trained on blocks.0.hook_mlp_out"),
        (["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "5", "--sae", "{root}/wide.safetensors"], "trained on blocks.0.hook_mlp_out"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "{root}/wide.safetensors"], "has d_in=96 but tiny-gpt2 mlp_out is 64 wide"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "{root}/trunc.safetensors"], "corrupt or truncated"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "{root}/nohook.safetensors"], "no hook name); give --site and --layer"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--shard", "3/2"], "--shard '3/2': I must lie in 1..N"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "sae_lens:gpt2-small-res-jb/blocks.77.hook_resid_pre"], "unknown SAE id in release gpt2-small-res-jb"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--context-len", "4096"], "exceeds tiny-gpt2's maximum context of 256"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--interventions", "cosine_matched:cos=1.5"], "1.5"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--interventions", "cosine_matched:norm_frac=-1"], "-1"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--dataset", "text:{root}/empty.txt"], "empty.txt"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--dataset", "text:{root}/latin1.txt"], "latin1.txt"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--out", "{root}/locked/run"], "is not writable"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--out", "{root}/empty.txt/run"], "is not writable"),
        (["replicate", "--model", "tiny-gpt2", "--sae", SAE, "--layer", "x"], "'x' is not a layer"),
        (["replicate", "--model", "tiny-gtp2", "--site", "mlp_out", "--layer", "0"], "unknown model 'tiny-gtp2' (did you mean 'tiny-gpt2'?)"),
        (["replicate", "--model", "tiny-gpt2", "--site", "mlp", "--layer", "0"], "unknown site 'mlp'"),
        (["replicate", "--model", "tiny-gpt2", "--mode", "all", "--site", "mlp_out", "--layer", "0"], "unknown mode 'all'"),
        (["replicate", "--model", "tiny-gpt2", "--tokens", "0", "--site", "mlp_out", "--layer", "0"], "--tokens must be an integer ≥ 1, got 0"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "/nonexistent/sae"], "'/nonexistent/sae'"),
        (["replicate", "--model", "tiny-gpt2", "--sae", "sae_lense:gpt2-small-res-jb/blocks.0.hook_resid_pre"],
         "unknown SAE loader 'sae_lense' (did you mean 'sae_lens'?)"),
        (["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--mode", "single_token",
          "--position", "30", "--k", "16", "--context-len", "40"], "needs context_len ≥ 47"),
    ],
)
def test_bad_input_one_line_no_traceback(tmp_path, capsys, bad_files, argv, message):
    import os

    if "locked" in " ".join(argv) and os.geteuid() == 0:
        pytest.skip("root can write anywhere: the unwritable-folder case needs an ordinary user")
    argv = [a.replace("{root}", str(bad_files)) for a in argv]
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klgap: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "report.json").exists()
    assert not list(tmp_path.glob("out/parts/*.json"))


def test_unknown_plugin_in_disable_list(monkeypatch, capsys):
    from klgap.plugins.manager import reset_host

    monkeypatch.setenv("KLGAP_DISABLE_PLUGINS", "hf_modls")
    reset_host()
    try:
        assert main(["plugins"]) == 2
    finally:
        monkeypatch.delenv("KLGAP_DISABLE_PLUGINS")
        reset_host()
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and "unknown plugin 'hf_modls' (did you mean 'hf_models'?)" in err


def test_console_script_installed():
    exe = shutil.which("klgap") or str(Path(__file__).parents[2] / ".venv" / "bin" / "klgap")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip()


def test_every_flag_of_every_subcommand_has_help_and_every_subcommand_a_description():
    """`klgap X --help` explains every flag (issue 16 item 7), for the core's and the built-in plugins' commands."""
    import argparse

    from klgap.cli.args import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"replicate", "curve", "train-sae", "report", "check", "models", "build-corpus", "saes"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert sub.description, f"klgap {name} has no description"
        bare = [a.option_strings[0] if a.option_strings else a.dest for a in sub._actions
                if a.dest != "help" and not a.help]
        assert bare == [], f"klgap {name}: no help for {bare}"
