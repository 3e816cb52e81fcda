"""The suffix replay's check against a full forward (klgap/forward/executors.py) costs little: the first batch's
clean forward is the check's and is kept for that batch; the replay and the nnsight reference cover only its
first contexts (klgap/forward/suffix.py replays a cut of the recorded calls)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.forward import executors
from klgap.forward.suffix import SuffixRunner
from klgap.job.batches import measure_batch
from klgap.job.cells import prepare
from klgap.job.loaded import LoadedJob
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from tests.helpers import random_sae, run_config


def _batch0(prep):
    job = LoadedJob.of_run(prep)
    [(frame, _)] = measure_batch(job, 0, job.cells)
    return frame


def test_a_one_batch_run_pays_for_the_clean_forward_once(tmp_path, load_model):
    lm = load_model("tiny-llama")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("mlp_out", 1))
    cfg = RunConfig(model="tiny-llama", sae=str(sae), tokens=4 * 32, context_len=32, batch_size=4, device="cpu",
                    dataset="random", interventions=["sae", "epsilon_random", "zero"])
    calls: list[int] = []
    prep = prepare(cfg)  # loads the model before counting
    model = prep.model.hf_model
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append(int(k["input_ids"].shape[0])), with_kwargs=True)
    try:
        prep = prepare(cfg)
        assert prep.execution["path"] == "suffix-replay" and prep.execution["replay_check_relative_error"] <= 1e-5
        assert calls == [4, 2]  # the batch's clean forward (kept), nnsight's reference on its first 2 contexts
        frame = _batch0(prep)
        assert calls == [4, 2]  # batch 0 ran no other full forward
        _batch0(prep)
        assert calls == [4, 2, 4]  # once used, the kept forward is gone
        calls.clear()
        report = run_config(cfg, tmp_path / "run")  # the job's own batch loop: loaded, checked, measured, written
        assert prep.model.hf_model is model and report.execution["path"] == "suffix-replay"
        assert calls == [4, 2]  # the whole one-batch run: the check's two forwards, nothing else
    finally:
        handle.remove()
    ran = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    np.testing.assert_array_equal(ran["kl"].to_numpy(), frame["kl"].to_numpy())
    slow = _batch0(prepare(RunConfig(**{**cfg.to_dict(), "no_fast": True})))
    torch.testing.assert_close(torch.tensor(frame["kl"].to_numpy()), torch.tensor(slow["kl"].to_numpy()), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
@pytest.mark.parametrize("site", ["resid_pre", "mlp_out", "attn_z"])
def test_replay_of_the_first_rows_is_the_replay_of_the_batch_cut(load_model, model, site):
    """Replaying the first 2 contexts of a recorded batch of 4 (alone and stacked twice) gives the first rows of
    replaying all 4."""
    lm = load_model(model)
    runner = SuffixRunner(lm, lm.site_map(site, 1), 1)
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    acts, logits = runner.clean(ids)
    x = acts[:, 1:] * 0.7
    whole = runner.patched(x, slice(1, None))
    cut = runner.patched(x[:2], slice(1, None), rows=2)
    torch.testing.assert_close(cut, whole[:2], rtol=1e-5, atol=1e-5)
    stacked = runner.patched(torch.cat([x[:2], acts[:2, 1:]]), slice(1, None), copies=2, rows=2)
    torch.testing.assert_close(stacked[:2], whole[:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked[2:], logits[:2], rtol=1e-5, atol=1e-5)
    assert executors.CHECK_ROWS == 2
