"""The declared GPT-2 / Pythia replications check out offline and fail here with a clear hub error."""

from __future__ import annotations

from pathlib import Path

import pytest

from klgap.cli.main import main

ROOT = Path(__file__).resolve().parents[2] / "replications"
HUB_CONFIGS = sorted(
    p for folder in ("gpt2-small-res-jb", "gpt2-small-attn", "pythia-70m-deduped") for p in (ROOT / folder).glob("*.toml")
)
EXPECTED_RUNS = {"all_tokens.toml": 12, "single_token.toml": 12, "many_samples.toml": 1, "mlp_out.toml": 2, "attn_out.toml": 2}


def test_every_declared_replication_has_configs_and_a_readme():
    assert len(HUB_CONFIGS) == 6
    for folder in {p.parent for p in HUB_CONFIGS}:
        assert (folder / "README.md").is_file()


@pytest.mark.parametrize("config", HUB_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_checks_sae_ids_and_hook_names_against_the_sae_lens_directory(config, capsys):
    assert main(["replicate", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n_runs = EXPECTED_RUNS[config.name]
    assert f"ok: {n_runs} run(s) check out" in out
    assert out.count(": checked") == n_runs  # every SAE id found in the release, its hook = the run's site/layer
    assert "SAE weights: the Hugging Face hub or its cache (repo " in out


@pytest.mark.parametrize("config", HUB_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_running_offline_fails_with_a_needs_the_hub_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["replicate", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klgap: error: ") and "needs the Hugging Face hub" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("report.json"))


def test_dry_run_catches_a_wrong_sae_id_and_a_hook_mismatch(tmp_path, capsys):
    bad_id = tmp_path / "bad_id.toml"
    bad_id.write_text(
        (ROOT / "gpt2-small-res-jb" / "many_samples.toml").read_text().replace("blocks.6.hook_resid_pre", "blocks.66.hook_resid_pre")
    )
    assert main(["replicate", "--config", str(bad_id), "--dry-run"]) == 2
    assert "unknown SAE id in release gpt2-small-res-jb" in capsys.readouterr().err
    mismatch = tmp_path / "mismatch.toml"
    mismatch.write_text((ROOT / "pythia-70m-deduped" / "mlp_out.toml").read_text().replace('site = "mlp_out"', 'site = "attn_out"'))
    assert main(["replicate", "--config", str(mismatch), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "was trained on blocks.0.hook_mlp_out (site mlp_out, layer 0) but --site attn_out --layer 0" in err
