"""`klgap replicate --joint` and `joint = true` in a config file: one joint run folder, each site alone under it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from klgap.cli.main import main
from klgap.report.read import load_report
from klgap.plan.sites import hook_name
from tests.close import assert_identical_frames
from tests.helpers import random_sae

ARGS = ["--dataset", "random", "--tokens", "128", "--context-len", "32", "--batch-size", "2",
        "--interventions", "sae,epsilon_random", "--quiet"]


def _saes(tmp_path, layers=(0, 1)):
    for layer in layers:
        random_sae(tmp_path / f"resid_post-L{layer}.safetensors", 64, 128, hook_name("resid_post", layer), seed=layer)
    return str(tmp_path / "{site}-L{layer}.safetensors")


def test_replicate_joint(tmp_path, capsys):
    out = tmp_path / "joint"
    argv = ["replicate", "--model", "tiny-gpt2", "--site", "resid_post", "--layer", "0,1", "--joint",
            "--sae", _saes(tmp_path), *ARGS, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "joint blocks.0.hook_resid_post + blocks.1.hook_resid_post" in printed
    assert "joint ratio − largest single-site ratio" in printed
    report = load_report(out)
    record = json.loads((out / "run.json").read_text())
    assert [site["hook_name"] for site in record["joint"]] == [hook_name("resid_post", v) for v in (0, 1)]
    assert record["config"]["joint"] is True and record["config"]["layer"] == [0, 1]
    found = report.compounding
    assert [site.path for site in found.sites] == ["single/resid_post_L00", "single/resid_post_L01"]
    for site in found.sites:  # each site alone is an ordinary run folder with its own report
        alone = load_report(out / site.path)
        assert alone.hook_name == site.hook_name and alone.interventions["sae"].kl_mean == site.kl_mean["sae"]
    joint_sae = pd.read_parquet(out / "tokens.parquet").query("intervention == 'sae'").kl.mean()
    assert found.additivity["sae"].joint_kl_mean == pytest.approx(joint_sae, rel=1e-6)
    assert found.additivity["sae"].sum_single_kl_mean == pytest.approx(sum(s.kl_mean["sae"] for s in found.sites))
    assert "## Compounding" in (out / "report.md").read_text()
    assert main(argv) == 0  # a finished joint run resumes to the same report
    assert load_report(out).compounding == found


def test_joint_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "joint.toml"
    config.write_text(f"""
model = "tiny-gpt2"
site = "resid_post"
layer = [0, 1]
joint = true
sae = "{_saes(tmp_path)}"
dataset = "random"
tokens = 64
context_len = 32
interventions = ["sae", "epsilon_random"]
out = "{tmp_path / 'from-file'}"
""")
    assert main(["replicate", "--config", str(config), "--quiet"]) == 0
    assert len(load_report(tmp_path / "from-file").compounding.sites) == 2


@pytest.mark.parametrize("extra, message", [
    (["--mode", "single_token", "--position", "30", "--k", "5"], "--context-len 32 is too short"),
    (["--joint-subsets"], "--joint-subsets needs at least 3 sites/layers"),
    (["--sae", "/nowhere/sae.safetensors"], "names one SAE but several sites/layers"),
    (["--joint-baseline", "matchd"], "klgap: error: unknown joint-baseline 'matchd' (did you mean 'matched'?); "
                                     "valid: clean, matched, reencoded\n"),
])
def test_joint_bad_input_exits_2(tmp_path, capsys, extra, message):
    argv = ["replicate", "--model", "tiny-gpt2", "--site", "resid_post", "--layer", "0,1", "--joint",
            "--sae", _saes(tmp_path), *ARGS, "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_joint_run_resumes_only_with_its_baseline_mode(tmp_path, capsys):
    """--joint-baseline is part of the run's identity: the same folder with another mode is refused (one line);
    the single-site folders under it do not depend on it."""
    out = tmp_path / "joint"
    argv = ["replicate", "--model", "tiny-gpt2", "--site", "resid_post", "--layer", "0,1", "--joint",
            "--sae", _saes(tmp_path), *ARGS, "--tokens", "64", "--out", str(out)]
    assert main([*argv, "--joint-baseline", "clean"]) == 0
    assert json.loads((out / "run_config.json").read_text())["joint_baseline"] == "clean"
    assert "joint_baseline" not in json.loads((out / "single" / "resid_post_L00" / "run_config.json").read_text())
    assert load_report(out).compounding.joint_baseline == "clean"
    capsys.readouterr()
    assert main(argv) == 2  # the default, matched
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a different run" in err and "joint_baseline" in err
    assert main([*argv, "--joint-baseline", "clean"]) == 0  # the same mode resumes


VOLATILE = {"provenance", "created_at", "timing"}


def _numbers(folder):
    return {k: v for k, v in json.loads((folder / "report.json").read_text()).items() if k not in VOLATILE}


def test_sharded_joint_run_merges_into_the_unsharded_one(tmp_path, capsys):
    """--shard I/N of a joint run with --joint-subsets: each shard writes its batches into every folder (the
    joint run, each site alone, each subset); `klgap merge` gives the unsharded run's numbers, folder by folder,
    and so does `klgap report` of the merged folder with every report.json gone."""
    sites = ("attn_out", "mlp_out", "resid_post")
    for k, site in enumerate(sites):
        random_sae(tmp_path / f"{site}-L1.safetensors", 64, 128, hook_name(site, 1), seed=k)
    argv = ["replicate", "--model", "tiny-gpt2", "--site", ",".join(sites), "--layer", "1", "--joint",
            "--joint-subsets", "--sae", str(tmp_path / "{site}-L{layer}.safetensors"), *ARGS, "--tokens", str(5 * 32),
            "--batch-size", "1", "--interventions", "sae,epsilon_random,theta_random"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    for i in (1, 2):
        assert main([*argv, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
        assert not (tmp_path / f"s{i}" / "report.json").exists()
    assert json.loads((tmp_path / "s2" / "single" / "mlp_out_L01" / "shard.json").read_text())["batches"] == [1, 3]
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s2"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "every subset of the sites patched together" in capsys.readouterr().out
    full = load_report(tmp_path / "full")
    folders = [".", *(s.path for s in full.joint), *(s.path for s in full.compounding.subsets)]
    assert len(folders) == 1 + 3 + 3
    for folder in folders:
        assert _numbers(tmp_path / "m" / folder) == _numbers(tmp_path / "full" / folder), folder
        assert_identical_frames(pd.read_parquet(tmp_path / "m" / folder / "tokens.parquet"),
                                      pd.read_parquet(tmp_path / "full" / folder / "tokens.parquet"))
    assert full.compounding.subsets[0].compounding.additivity["sae"].joint_kl_mean > 0
    assert "Every subset of two or more sites" in (tmp_path / "m" / "report.md").read_text()
    # a joint run killed before its reports: `klgap report` builds each site's and subset's first, then its own
    for path in (tmp_path / "m").rglob("report.json"):
        path.unlink()
    assert main(["report", str(tmp_path / "m")]) == 0
    for folder in folders:
        assert _numbers(tmp_path / "m" / folder) == _numbers(tmp_path / "full" / folder), folder


def test_declared_compounding_replication_checks_out(capsys):
    """replications/compounding/joint.toml (not run yet) resolves offline: four resid_post sites, jointly."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "replications" / "compounding" / "joint.toml"
    assert main(["replicate", "--config", str(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "joint run" in printed and "ok: 4 run(s) check out" in printed
    for layer in (3, 10, 17, 24):
        assert f"resid_post L{layer}:" in printed
