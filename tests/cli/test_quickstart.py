"""The README's main command, run as a new user runs it: the quickstart config (scaled down) from a fresh HOME,
through the installed ``klgap`` script, in a subprocess. CI fails when the front door does (issue 28)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _readme_quickstart_config() -> Path:
    """The config the README's first command runs (``klgap replicate --config PATH``)."""
    match = re.search(r"klgap replicate --config (\S+)", (ROOT / "README.md").read_text())
    assert match, "the README's quickstart command is gone"
    return ROOT / match.group(1)


def _scaled_down(config: Path, into: Path) -> Path:
    """The same TOML with fewer tokens and training steps; every other key as committed."""
    text = config.read_text()
    assert "\n[train_sae]\n" in text, "the quickstart trains its SAE on first use; this test plays that first use"
    top, train = text.split("\n[train_sae]\n", 1)
    top = re.sub(r"(?m)^tokens = \d+$", "tokens = 256", top)
    train = re.sub(r"(?m)^steps = \d+$", "steps = 20", re.sub(r"(?m)^tokens = \d+$", "tokens = 4096", train))
    scaled = top + "\n[train_sae]\n" + train
    assert tomllib.loads(scaled)["tokens"] == 256 and tomllib.loads(scaled)["train_sae"]["steps"] == 20
    path = into / "config.toml"
    path.write_text(scaled)
    return path


@pytest.mark.skipif(not (Path(sys.executable).parent / "klgap").exists(), reason="klgap is not installed as a script")
def test_the_readme_quickstart_runs_from_a_fresh_home(tmp_path):
    config = _scaled_down(_readme_quickstart_config(), tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run([str(Path(sys.executable).parent / "klgap"), "replicate", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr

    # the SAE was trained into the fresh HOME, where the config says, on the train split
    declared = tomllib.loads(config.read_text())
    sae = Path(declared["sae"].replace("~", str(home), 1))
    assert (sae / "cfg.json").exists() and (sae / "sae_weights.safetensors").exists()
    # the run folder holds the data and the pages
    out = tmp_path / declared["out"]
    report = json.loads((out / "report.json").read_text())
    assert {"report.md", "report.html", "tokens.parquet"} <= {p.name for p in out.iterdir()}
    assert report["site"] == declared["site"] and report["layer"] == declared["layer"]
    assert report["n_tokens"] == declared["tokens"] - 2  # 2 contexts of 128, the first position left out
    kl = {name: row["kl_mean"] for name, row in report["interventions"].items()}
    assert kl["sae"] > 0 and kl["epsilon_random"] > 0
    assert report["kl_ratio_sae_over_epsilon_random"] == pytest.approx(kl["sae"] / kl["epsilon_random"])
    # the report's opening sentence (against each baseline the run measured) is printed, with ratios and intervals
    from klgap.report.panel import opening_sentence
    from klgap.report.read import load_report

    found = load_report(out)
    sentence = opening_sentence(found, found.model, found.mode)
    assert sentence in proc.stdout and sentence.startswith(f"At blocks.{declared['layer']}.hook_mlp_out of smollm2-135m")
    # (2 contexts here: the verdict may be "indistinguishable", as no Wilcoxon over 2 contexts reaches p ≤ 0.05)
    # the config measures zero: kl_div_score, ce_loss_score and the clean CE follow L0
    assert re.search(r"the SAE's reconstruction \(explained variance [-\d.]+, L0 [\d.]+, kl_div_score [-\d.]+, "
                     r"ce_loss_score (withheld|[-\d.]+), clean CE [\d.]+ nats/token\) .*[\d.]+× \[[\d.]+, [\d.]+\]",
                     sentence), sentence
    assert report["sae_lens_scores"]["ce_loss_with_ablation"] > report["ce_clean"]["mean"] > 0
