"""Order-free draws: an intervention's random numbers are keyed by its name and parameters (klgap.job.view.draw_key),
so permuting ``--interventions`` or listing another intervention leaves each intervention's per-token numbers as
they were, in every mode and in a joint run's every site."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from klgap.cli.main import main
from klgap.job.view import draw_generator, draw_key, name_key
from klgap.plan.sites import hook_name
from tests.helpers import random_sae

ARGS = ["--model", "tiny-gpt2", "--dataset", "random", "--tokens", "96", "--context-len", "16", "--batch-size", "2",
        "--seed", "5", "--quiet"]
MODES = {"all_tokens": [], "single_token": ["--mode", "single_token", "--position", "6", "--k", "3"],
         "many_samples": ["--mode", "many_samples", "--position", "6", "--n-samples", "5",
                          "--sample-intervention", "epsilon_random"]}
LISTED = ["sae", "epsilon_random", "cosine_matched:cos=0.8,norm_frac=0.9", "theta_random"]


def _tokens(out, sae, interventions, *extra) -> dict[str, pd.DataFrame]:
    """Each intervention's rows, and under "ce_clean" each token's clean CE (stored once per token, on the rows of
    whichever intervention is listed first: klgap/job/modes.py, so it is compared per token, not per intervention)."""
    assert main(["replicate", *ARGS, "--sae", str(sae), "--interventions", ",".join(interventions), *extra,
                 "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "tokens.parquet")
    keys = [c for c in ("context", "position", "draw") if c in frame.columns]
    clean = frame.loc[frame.ce_clean.notna(), ["context", "position", "ce_clean"]]
    found = {name: rows.drop(columns="ce_clean").sort_values(keys).reset_index(drop=True)
             for name, rows in frame.groupby("intervention")}
    return {**found, "ce_clean": clean.sort_values(["context", "position"]).reset_index(drop=True)}


def _same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame], names) -> None:
    for name in names:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)


@pytest.fixture
def sae(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    return random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("resid_pre", 1))


@pytest.mark.parametrize("mode", MODES)
def test_permuted_interventions_give_identical_numbers(tmp_path, sae, mode):
    first = _tokens(tmp_path / "a", sae, LISTED, *MODES[mode])
    permuted = _tokens(tmp_path / "b", sae, LISTED[::-1], *MODES[mode])
    assert sorted(first) == sorted(permuted)
    assert first["epsilon_random"].kl.gt(0).all() and len(first["ce_clean"])  # real draws, not an empty frame
    _same(first, permuted, first)


@pytest.mark.parametrize("mode", ["all_tokens", "many_samples"])
def test_adding_an_intervention_leaves_the_others_alone(tmp_path, sae, mode):
    alone = _tokens(tmp_path / "a", sae, ["sae", "epsilon_random"], *MODES[mode])
    more = _tokens(tmp_path / "b", sae, ["sae", "zero", "theta_random", "epsilon_random"], *MODES[mode])
    _same(alone, more, alone)
    # two stochastic interventions draw from different streams
    assert not more["theta_random"].kl.equals(more["epsilon_random"].kl)


def test_joint_sites_draw_apart_and_order_free(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    for layer in (0, 1):
        random_sae(tmp_path / f"resid_post-L{layer}.safetensors", lm.d_model, 128, hook_name("resid_post", layer),
                   seed=layer)
    template = str(tmp_path / "resid_post-L{layer}.safetensors")
    joint = ["--site", "resid_post", "--layer", "0,1", "--joint"]
    a = _tokens(tmp_path / "a", template, ["sae", "epsilon_random", "theta_random"], *joint)
    b = _tokens(tmp_path / "b", template, ["theta_random", "zero", "epsilon_random", "sae"], *joint)
    _same(a, b, a)
    for site in ("single/resid_post_L00", "single/resid_post_L01"):
        alone_a = pd.read_parquet(tmp_path / "a" / site / "tokens.parquet").query("intervention == 'epsilon_random'")
        alone_b = pd.read_parquet(tmp_path / "b" / site / "tokens.parquet").query("intervention == 'epsilon_random'")
        assert alone_a.kl.to_numpy().tolist() == alone_b.kl.to_numpy().tolist()


def test_draw_key_is_stable_and_keeps_streams_apart():
    # a stable hash of the name (never Python's hash(), which changes per process): pinned numbers
    assert name_key("epsilon_random") == 0x85A145874C86FC1C  # the first 8 bytes of sha256(b"epsilon_random")
    assert name_key("epsilon_random") == name_key("epsilon_random") != name_key("theta_random")
    assert name_key("cosine_matched(cos=0.8,norm_frac=0.9)") != name_key("cosine_matched(cos=0.7,norm_frac=0.9)")
    keys = {draw_key(0, 3, "epsilon_random"), draw_key(0, 3, "epsilon_random", site=1),
            draw_key(0, 3, "epsilon_random", context=0), draw_key(0, 3, "epsilon_random", context=1),
            draw_key(0, 3, "epsilon_random", context=0, site=1), draw_key(0, 4, "epsilon_random"),
            draw_key(1, 3, "epsilon_random")}
    assert len(keys) == 7  # one draw per token, each many-samples context and each joint site: separate streams
    cpu = torch.device("cpu")
    draws = [torch.randn(4, generator=draw_generator(cpu, 0, 3, "epsilon_random", site=k)) for k in range(2)]
    assert not torch.equal(*draws)
