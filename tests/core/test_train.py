"""train_sae: sae_lens's trainer on activations gathered through nnsight, saved in sae_lens's format."""

from __future__ import annotations

import json

import pytest
import torch

from klgap.job.loading import load_sae
from klgap.errors import KlgapError
from klgap.plugins.manager import registry
from klgap.sae.fit import train_sae
from klgap.sae.gather import gather


def test_train_sae_on_tiny_gpt2(tmp_path, load_model):
    model = load_model("tiny-gpt2")
    contexts = registry("token_source").get("sample").contexts(model, 300, 64, 0, True, "train")
    result = train_sae(model, "mlp_out", 1, contexts, tmp_path / "sae", steps=400, progress=False)
    saved = json.loads((tmp_path / "sae" / "training.json").read_text())
    assert saved == result
    assert result["hook_name"] == "blocks.1.hook_mlp_out" and result["d_sae"] == 8 * 64
    assert result["n_training_tokens"] + result["n_eval_tokens"] == 300 * 63
    assert result["explained_variance"] > 0.5 and 0 < result["l0_mean"] < 512
    sae = load_sae(str(tmp_path / "sae"), torch.device("cpu"))
    assert sae.hook_name == "blocks.1.hook_mlp_out" and sae.info["training"]["seed"] == 0
    # the saved SAE works on raw activations (normalisation folded in): same explained variance
    acts = gather(model, "mlp_out", 1, contexts[:20])
    x_hat = sae.decode(sae.encode(acts))
    ev = 1 - ((acts - x_hat) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    assert ev > 0.5


def test_train_sae_is_deterministic(tmp_path, load_model):
    model = load_model("tiny-pythia")
    contexts = registry("token_source").get("random").contexts(model, 60, 32, 0, True, None)
    a = train_sae(model, "attn_out", 0, contexts, tmp_path / "a", steps=50, train_batch_size=256, progress=False)
    b = train_sae(model, "attn_out", 0, contexts, tmp_path / "b", steps=50, train_batch_size=256, progress=False)
    assert a["explained_variance"] == b["explained_variance"]
    assert (tmp_path / "a" / "sae_weights.safetensors").read_bytes() == (tmp_path / "b" / "sae_weights.safetensors").read_bytes()


def test_gather_many_equals_one_site_at_a_time(load_model):
    from klgap.forward import activations
    from klgap.sae.gather import gather_many

    lm = load_model("tiny-llama")
    contexts = torch.randint(0, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    pairs = [("mlp_out", 1), ("resid_pre", 0), ("attn_out", 1), ("resid_post", 0), ("attn_z", 1)]
    many = gather_many(lm, pairs, contexts, batch_size=4)
    for site, layer in pairs:  # one site per forward pass, position 0 left out, as gather_many does
        one = activations.collect(lm, lm.site_map(site, layer), contexts)[:, 1:].reshape(-1, lm.site_widths[site])
        assert many[(site, layer)].shape == one.shape == (6 * 15, lm.site_widths[site])
        torch.testing.assert_close(many[(site, layer)], one, rtol=0, atol=0)


def test_train_sae_several_sites_and_layers_in_one_pass(tmp_path, capsys):
    from klgap.cli.main import main

    out = tmp_path / "saes" / "blocks.{layer}.hook_{site}"
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out,attn_out", "--layer", "0,1", "--tokens", "8000",
                 "--steps", "30", "--dataset", "random", "--out", str(out), "--quiet"]) == 0
    for site in ("mlp_out", "attn_out"):
        for layer in (0, 1):
            folder = tmp_path / "saes" / f"blocks.{layer}.hook_{site}"
            info = json.loads((folder / "training.json").read_text())
            assert info["hook_name"] == f"blocks.{layer}.hook_{site}" and info["n_training_tokens"] > 6000
            assert (folder / "sae_weights.safetensors").is_file()
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,1", "--out", str(tmp_path / "one"),
                 "--dataset", "random"]) == 2
    assert "put {layer} and {site} in it" in capsys.readouterr().err


def test_b_dec_at_the_mean_for_activations_with_a_large_common_offset(tmp_path, load_model):
    """A site whose activations share an offset much larger than their spread (‖mean‖ ≈ 20× the spread, like
    SmolLM2's attn_out at layer 24): starting the decoder bias at zero spends latents on the offset; at the mean
    the same budget reconstructs the spread. The saved SAE still works on raw activations."""
    from klgap.errors import KlgapError
    from klgap.sae.fit import fit_sae

    model = load_model("tiny-gpt2")
    contexts = registry("token_source").get("sample").contexts(model, 200, 64, 0, True, "train")
    acts = gather(model, "mlp_out", 1, contexts)
    spread = (acts - acts.mean(0)).norm(dim=-1).mean()
    direction = torch.nn.functional.normalize(torch.randn(acts.shape[-1], generator=torch.Generator().manual_seed(1)), dim=0)
    shifted = acts + 20 * spread * direction
    kw = dict(steps=300, progress=False, l1_coefficient=5.0)
    zeros = fit_sae(model, "mlp_out", 1, shifted, tmp_path / "zeros", **kw)
    mean = fit_sae(model, "mlp_out", 1, shifted, tmp_path / "mean", b_dec_init="mean", **kw)
    assert mean["b_dec_init"] == "mean" and zeros["b_dec_init"] == "zeros"
    assert mean["explained_variance"] > zeros["explained_variance"] + 0.1
    assert mean["explained_variance"] > 0.5
    sae = load_sae(str(tmp_path / "mean"), torch.device("cpu"))
    x_hat = sae.decode(sae.encode(shifted[:2000]))
    ev = 1 - ((shifted[:2000] - x_hat) ** 2).sum() / ((shifted[:2000] - shifted[:2000].mean(0)) ** 2).sum()
    assert ev > 0.5
    with pytest.raises(KlgapError, match=r"unknown b_dec_init 'median'; valid: zeros, mean"):
        fit_sae(model, "mlp_out", 1, shifted, tmp_path / "bad", b_dec_init="median", **kw)


def test_recipe_overrides_per_sae(capsys):
    """[train_sae.sites.SITE_L<layer>] tables change the recipe of one SAE; bad names and keys are refused."""
    from klgap.sae.recipes import recipe_overrides
    from klgap.errors import KlgapError

    recipe = {"l1": 3, "sites": {"attn_out_L24": {"l1": 10, "steps": 3000, "b_dec_init": "mean"}, "resid_post_L3": {"lr": 5e-4}}}
    assert recipe_overrides(recipe) == {("attn_out", 24): {"l1_coefficient": 10, "steps": 3000, "b_dec_init": "mean"},
                                        ("resid_post", 3): {"lr": 5e-4}}
    assert recipe_overrides({"l1": 3}) == {}
    with pytest.raises(KlgapError, match=r"name the SAE as SITE_L<layer>, e.g. attn_out_L24"):
        recipe_overrides({"sites": {"attn_24": {"l1": 10}}})
    with pytest.raises(KlgapError, match=r"unknown \[train_sae.sites.attn_out_L24\] key 'l2'.*valid: architecture, b_dec_init, l1, lr, steps, top_k"):
        recipe_overrides({"sites": {"attn_out_L24": {"l2": 10}}})
    # train-sae's TopK latents per token are `top_k` (replicate's --k is single-token mode's); `k` still reads
    topk = {"sites": {"mlp_out_L6": {"architecture": "topk", "top_k": 64}}}
    assert recipe_overrides(topk) == recipe_overrides({"sites": {"mlp_out_L6": {"architecture": "topk", "k": 64}}}) == \
        {("mlp_out", 6): {"architecture": "topk", "k": 64}}
    assert "[train_sae.sites.mlp_out_L6] key 'k' is deprecated: write top_k = 64" in capsys.readouterr().err


def test_a_topk_sae_has_k_latents_per_token_and_loads_like_any_other(tmp_path, load_model):
    """--architecture topk --top-k K: sae_lens's TopK trainer (no L1); the saved folder loads through the sae_lens path."""
    from klgap.errors import KlgapError
    from klgap.sae.fit import fit_sae

    model = load_model("tiny-gpt2")
    contexts = registry("token_source").get("sample").contexts(model, 120, 64, 0, True, "train")
    acts = gather(model, "mlp_out", 1, contexts)
    result = fit_sae(model, "mlp_out", 1, acts, tmp_path / "topk", architecture="topk", k=8, steps=200,
                     b_dec_init="mean", progress=False)
    assert (result["architecture"], result["k"]) == ("topk", 8) and "l1_coefficient" not in result
    assert 7.0 <= result["l0_mean"] <= 8.0 and result["explained_variance"] > 0.5
    sae = load_sae(str(tmp_path / "topk"), torch.device("cpu"))
    feats = sae.encode(acts[:500])
    assert int((feats != 0).sum(-1).max()) <= 8 and sae.info["training"]["k"] == 8
    x_hat = sae.decode(feats)
    assert float(1 - ((acts[:500] - x_hat) ** 2).sum() / ((acts[:500] - acts[:500].mean(0)) ** 2).sum()) > 0.5
    for bad, message in (({"k": None}, r"--architecture topk needs --top-k, an integer ≥ 1 ≤ d_sae \(512\); got None"),
                         ({"k": 600}, r"got 600"),
                         ({"architecture": "standard"}, r"--top-k 8 is the latents per token of --architecture topk"),
                         ({"architecture": "gated"}, r"unknown --architecture 'gated'.*valid: standard, topk")):
        with pytest.raises(KlgapError, match=message):
            fit_sae(model, "mlp_out", 1, acts, tmp_path / "bad", **{"architecture": "topk", "k": 8, **bad})
    from klgap.cli.main import main

    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "1", "--out", str(tmp_path / "x"),
                 "--architecture", "topk", "--dataset", "random"]) == 2


# ----------------------------------------------------------------------------- sizing: --tokens, --epochs, --steps


def test_steps_for_one_pass_by_default_epochs_or_steps_otherwise():
    from klgap.sae.train import TRAIN_BATCH, steps_for

    assert TRAIN_BATCH == 1024
    assert steps_for(20_000) == 20  # ceil(20000 / 1024): one pass, not 2000 steps (~107 passes)
    assert steps_for(20_000, epochs=3) == 59  # ceil(60000 / 1024)
    assert steps_for(20_000, epochs=0.5) == 10
    assert steps_for(100, steps=7) == 7  # explicit steps are kept exactly (the replication recipes)
    assert steps_for(10) == 1
    with pytest.raises(KlgapError, match=r"give --steps \(7\) or --epochs \(2\), not both"):
        steps_for(20_000, epochs=2, steps=7)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(KlgapError, match="--epochs must be a number > 0"):
            steps_for(20_000, epochs=bad)


def test_train_sae_reads_its_tokens_once_by_default_and_warns_when_steps_reuse_them(tmp_path, capsys):
    from klgap.cli.main import main

    base = ["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--tokens", "3000",
            "--context-len", "32", "--dataset", "random", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "once")]) == 0
    info = json.loads((tmp_path / "once" / "training.json").read_text())
    assert (info["steps"], info["n_training_samples"]) == (3, 3 * 1024)  # ceil(3000 / 1024) steps of 1024 tokens
    assert "warning" not in capsys.readouterr().err
    assert main([*base, "--steps", "20", "--out", str(tmp_path / "twenty")]) == 0
    assert json.loads((tmp_path / "twenty" / "training.json").read_text())["steps"] == 20
    err = capsys.readouterr().err
    assert "klgap: warning: training 20 steps of 1024 tokens reads 20,480 samples, 7 passes over --tokens 3,000" in err
    assert main([*base, "--steps", "20", "--epochs", "2", "--out", str(tmp_path / "both")]) == 2
    assert "give --steps (20) or --epochs (2.0), not both" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


def test_a_config_recipe_with_steps_trains_exactly_those_steps(tmp_path, capsys):
    """[train_sae] tables with `steps` (every committed replication's) keep their steps; epochs are read too."""
    from klgap.plan.config import RunConfig
    from klgap.sae.recipes import train_missing_sae

    config = RunConfig(model="tiny-gpt2", site="mlp_out", layer=0, sae=str(tmp_path / "blocks.{layer}.hook_{site}"),
                       dataset="random", context_len=32, device="cpu")
    recipe = {"tokens": 3000, "steps": 9, "sites": {"mlp_out_L1": {"steps": 4}}}
    train_missing_sae(config, recipe, progress=False, pairs=[("mlp_out", 0), ("mlp_out", 1)])
    steps = {layer: json.loads((tmp_path / f"blocks.{layer}.hook_mlp_out" / "training.json").read_text())["steps"]
             for layer in (0, 1)}
    assert steps == {0: 9, 1: 4}
    assert "warning" not in capsys.readouterr().err  # 9 steps read 3.1 passes, 4 steps 1.4: no reuse warning


def test_training_leaves_out_the_tokens_a_run_does_not_measure(tmp_path, load_model, capsys):
    """--exclude-special all (the default): the activations at position 0 and at the tokenizer's special ids
    (the separators packed between documents) are left out of training, as --mask-special all leaves them out of
    measurement (sae_lens's exclude_special_tokens=True); training.json records the rule and the ids."""
    import math

    from klgap.cli.main import main
    from klgap.job.masks import special_token_ids
    from klgap.sae.gather import gather_many

    from klgap.forward import activations
    from tests.core.test_agreement_sae_lens import write_documents

    model = load_model("tiny-gpt2")
    special = special_token_ids(model.tokenizer)
    assert special  # the tiny models' byte tokenizer: BOS = EOS = 256
    dataset = write_documents(tmp_path / "docs.jsonl", n_docs=600)
    n_contexts = math.ceil(6000 / 63)
    contexts = registry("token_source").get("text").contexts(model, n_contexts, 64, 0, True, dataset[len("text:"):])
    separators = int(torch.isin(contexts[:, 1:], torch.tensor(special)).sum())
    assert separators > 100  # the text source packs the documents with EOS between them

    acts = activations.collect(model, model.site_map("mlp_out", 1), contexts)  # [n 64 d]
    keep = ~torch.isin(contexts, torch.tensor(special))
    keep[:, 0] = False
    by_hand = acts[keep]
    activations_kept = gather_many(model, [("mlp_out", 1)], contexts, batch_size=16, exclude="all")[("mlp_out", 1)]
    torch.testing.assert_close(activations_kept, by_hand, rtol=0, atol=0)
    assert len(gather_many(model, [("mlp_out", 1)], contexts, exclude="none")[("mlp_out", 1)]) == n_contexts * 64

    for rule, expected in (("all", n_contexts * 63 - separators), ("first", n_contexts * 63)):
        out = tmp_path / rule
        args = ["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "1", "--tokens", "6000",
                "--context-len", "64", "--steps", "20", "--dataset", dataset, "--out", str(out), "--quiet"]
        assert main(args + ([] if rule == "all" else ["--exclude-special", rule])) == 0
        info = json.loads((out / "training.json").read_text())
        assert info["exclude_special"] == rule and info["n_training_tokens"] + info["n_eval_tokens"] == expected
        assert info["excluded_token_ids"] == (list(special) if rule == "all" else [])
        assert info["first_position"] == "excluded"
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "1", "--out",
                 str(tmp_path / "bad"), "--exclude-special", "some"]) == 2
    err = capsys.readouterr().err
    assert err == "klgap: error: unknown --exclude-special 'some'; valid: all, first, none\n"
    assert not (tmp_path / "bad").exists()
