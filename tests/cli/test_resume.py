"""Killed at any point (SIGKILL), the same command resumes and ends with the uninterrupted numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd

from tests.close import assert_identical_frames
from tests.helpers import random_sae


def _cmd(sae, out):
    return [sys.executable, "-m", "klgap", "replicate", "--model", "tiny-llama", "--sae", str(sae),
            "--dataset", "random", "--tokens", str(40 * 32), "--context-len", "32", "--batch-size", "1",
            "--interventions", "sae,epsilon_random,theta_random", "--out", str(out), "--quiet"]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, load_model):
    lm = load_model("tiny-llama")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, "blocks.1.hook_resid_pre")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    full = tmp_path / "full"
    subprocess.run(_cmd(sae, full), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(sae, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "parts").glob("batch_*.json"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "parts").glob("batch_*.json")))
    assert 3 <= done_before < 40, done_before  # really interrupted mid-run
    assert not (killed / "report.json").exists()

    resumed = subprocess.run(_cmd(sae, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_identical_frames(pd.read_parquet(full / "tokens.parquet"), pd.read_parquet(killed / "tokens.parquet"))
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert a["interventions"] == b["interventions"] and a["comparisons"] == b["comparisons"]
