"""SAE checkpoints (klgap/sae/checkpoints.py): saved while training, loadable, distinct, the last the final SAE."""

from __future__ import annotations

import json

import pytest
import torch

from klgap.sae.checkpoints import CheckpointInfo, count, expand
from klgap.job.loading import load_sae
from klgap.errors import KlgapError
from klgap.sae.fit import fit_sae
from klgap.sae.gather import gather
from klgap.sae.heldout import evaluate


@pytest.fixture(scope="module")
def acts(load_model):
    model = load_model("tiny-gpt2")
    contexts = torch.randint(0, 200, (80, 32), generator=torch.Generator().manual_seed(0))
    return model, gather(model, "mlp_out", 1, contexts)


def _state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "sae_weights.safetensors")


def test_checkpoints_load_are_distinct_and_the_last_is_the_final_sae(tmp_path, acts):
    model, x = acts
    out = tmp_path / "sae"
    result = fit_sae(model, "mlp_out", 1, x, out, steps=40, train_batch_size=256, checkpoints=4, progress=False)
    found = expand(str(out / "checkpoints" / "*"))
    assert [c.step for c in found] == [11, 21, 31, 40]  # sae_lens's thresholds: after 10, 20, 30 of 40 steps; the end
    assert [c.tokens_seen for c in found] == [256 * c.step for c in found]
    assert [c.path.name for c in found] == ["step-000011", "step-000021", "step-000031", "step-000040"]
    assert expand(str(out)) == found  # the SAE folder names its checkpoints too
    held_out = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][: result["n_eval_tokens"]]
    states = []
    for c in found:
        sae = load_sae(str(c.path), torch.device("cpu"))  # an ordinary sae_lens folder, checked like any SAE
        assert sae.hook_name == "blocks.1.hook_mlp_out" and sae.info["training"]["step"] == c.step
        measured = evaluate(sae, held_out, torch.device("cpu"))  # training.json's numbers are the saved SAE's
        assert measured["explained_variance"] == pytest.approx(c.explained_variance, abs=1e-6)
        assert measured["l0_mean"] == pytest.approx(c.l0_mean, abs=1e-6)
        states.append(_state(c.path))
    for a, b in zip(states, states[1:]):
        assert not torch.equal(a["W_enc"], b["W_enc"])
    final = _state(out)
    assert final.keys() == states[-1].keys() and all(torch.equal(final[k], states[-1][k]) for k in final)
    assert found[-1].explained_variance == result["explained_variance"] and result["checkpoints"] == 4
    assert json.loads((out / "training.json").read_text())["checkpoints"] == 4
    assert found[0].explained_variance < found[-1].explained_variance  # it learns
    assert not list(tmp_path.glob(".sae.*"))  # no staging folder left beside it


def test_checkpointing_leaves_the_trained_sae_unchanged(tmp_path, acts):
    model, x = acts
    fit_sae(model, "mlp_out", 1, x, tmp_path / "plain", steps=30, train_batch_size=256, progress=False)
    fit_sae(model, "mlp_out", 1, x, tmp_path / "ckpt", steps=30, train_batch_size=256, checkpoint_every=10,
            progress=False)
    assert (tmp_path / "plain" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "ckpt" / "sae_weights.safetensors").read_bytes()
    assert [c.step for c in expand(str(tmp_path / "ckpt"))] == [11, 21, 30]


def test_checkpoint_counts_and_bad_values():
    assert count(1200, 10, None) == 10 and count(1200, None, 100) == 12 and count(1200, None, 500) == 3
    assert count(1200, None, None) == 0
    for checkpoints, every, says in ((0, None, "--checkpoints must be"), (1201, None, "--checkpoints must be"),
                                     (None, 0, "--checkpoint-every must be"), (3, 100, "not both")):
        with pytest.raises(KlgapError, match=says):
            count(1200, checkpoints, every)


def test_expand_says_what_is_missing(tmp_path):
    with pytest.raises(KlgapError, match="matches no folder"):
        expand(str(tmp_path / "nothing" / "*"))
    (tmp_path / "sae").mkdir()
    with pytest.raises(KlgapError, match="has no checkpoints/ folder"):
        expand(str(tmp_path / "sae"))
    (tmp_path / "sae" / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(KlgapError, match="is not an SAE checkpoint"):
        CheckpointInfo.read(tmp_path / "sae" / "checkpoints" / "step-000001")


def test_train_sae_cli_checkpoints(tmp_path, capsys):
    from klgap.cli.main import main

    out = tmp_path / "saes" / "blocks.{layer}.hook_{site}"
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,1", "--tokens", "4000",
                 "--steps", "12", "--dataset", "random", "--checkpoints", "3", "--out", str(out), "--quiet"]) == 0
    for layer in (0, 1):
        found = expand(str(tmp_path / "saes" / f"blocks.{layer}.hook_mlp_out" / "checkpoints" / "*"))
        assert [c.step for c in found] == [5, 9, 12]
    capsys.readouterr()
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--steps", "12",
                 "--dataset", "random", "--checkpoints", "13", "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoints must be an integer from 1 to the training steps (12), got 13" in capsys.readouterr().err
