"""klgap.measure and friends: the Python API over objects a notebook holds, against the CLI's numbers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import klgap
from klgap.cli.main import main
from klgap.errors import KlgapError

HOOK = "blocks.1.hook_mlp_out"
RUN = {"tokens": 8 * 32, "context_len": 32, "batch_size": 4, "dataset": "random", "seed": 5,
       "interventions": "sae,epsilon_random,theta_random", "progress": False}


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A transformers model and a sae_lens SAE held in memory (tiny-gpt2's weights), and the SAE saved to disk."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from klgap.plugins.manager import registry

    lm = registry("model").get("tiny-gpt2").load(torch.device("cpu"), torch.float32)
    cfg = StandardSAEConfig(d_in=64, d_sae=256, device="cpu", dtype="float32")
    cfg.metadata.hook_name = HOOK
    sae = StandardSAE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(256, 64, generator=gen) / 8)
        sae.W_enc.copy_(sae.W_dec.T * 2)
        sae.b_enc.fill_(-0.05)
    folder = tmp_path_factory.mktemp("sae") / "sae"
    sae.save_model(str(folder))
    return lm.hf_model, lm.tokenizer, sae, folder


class EncodeDecode(torch.nn.Module):
    """An SAE that is only encode/decode (the same math as the sae_lens SAE: relu((x - b_dec) W_enc + b_enc))."""

    def __init__(self, sae):
        super().__init__()
        self.W_enc, self.b_enc = torch.nn.Parameter(sae.W_enc.detach().clone()), torch.nn.Parameter(sae.b_enc.detach().clone())
        self.W_dec, self.b_dec = torch.nn.Parameter(sae.W_dec.detach().clone()), torch.nn.Parameter(sae.b_dec.detach().clone())

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def _kl(tokens: pd.DataFrame) -> pd.Series:
    keyed = tokens.sort_values(["intervention", "context", "position"]).set_index(["intervention", "context", "position"])
    return keyed["kl"]


def test_measure_on_held_objects_equals_the_cli(held, tmp_path):
    hf, tok, sae, folder = held
    result = klgap.measure(hf, sae, tokenizer=tok, **RUN)
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(folder), "--dataset", "random", "--tokens", "256",
                 "--context-len", "32", "--batch-size", "4", "--seed", "5", "--interventions",
                 "sae,epsilon_random,theta_random", "--device", "cpu", "--quiet", "--out", str(tmp_path / "cli")]) == 0
    cli = klgap.load_run(tmp_path / "cli")
    pd.testing.assert_series_equal(_kl(result.tokens), _kl(cli.tokens))  # identical per-token KL
    assert result.report.interventions == cli.report.interventions
    assert result.path is None and result.ratio.ratio == pytest.approx(
        result.report.interventions["sae"].kl_mean / result.report.interventions["epsilon_random"].kl_mean)
    assert result.report.n_tokens == 8 * 31 and result.report.site == "mlp_out" and result.report.layer == 1


def test_an_encode_decode_sae_and_an_nnsight_model_give_the_same_numbers(held):
    from nnsight import LanguageModel

    hf, tok, sae, _ = held
    reference = klgap.measure(hf, sae, tokenizer=tok, **RUN)
    plain = klgap.measure(hf, EncodeDecode(sae), tokenizer=tok, site="mlp_out", layer=1, **RUN)
    wrapped = klgap.measure(LanguageModel(hf, tokenizer=tok), sae, **RUN)
    for other in (plain, wrapped):
        pd.testing.assert_series_equal(_kl(other.tokens), _kl(reference.tokens), rtol=1e-6, atol=1e-9)
    assert plain.report.sae.source == "in memory: EncodeDecode" and plain.report.sae.d_sae == 256


def test_saved_run_loads_back_identical_with_label_columns(held, tmp_path):
    hf, tok, sae, _ = held
    saved = klgap.measure(hf, sae, tokenizer=tok, out=tmp_path / "run", **RUN)
    loaded = klgap.load_run(tmp_path / "run")
    assert loaded.report == saved.report and saved.path == tmp_path / "run"
    assert list(loaded.tokens.columns[:4]) == ["model", "site", "layer", "sae"]
    assert set(loaded.tokens["site"]) == {"mlp_out"} and set(loaded.tokens["layer"]) == {1}
    both = pd.concat([loaded.tokens, klgap.measure(hf, sae, tokenizer=tok, **{**RUN, "seed": 6}).tokens])
    assert len(both) == 2 * 3 * 8 * 31
    summary = loaded.summary()
    assert summary.loc["sae", "kl_mean"] == loaded.report.interventions["sae"].kl_mean
    assert summary.loc["epsilon_random", "ratio_sae_over_this"] == loaded.ratio.ratio
    comparison = loaded.report.comparisons["epsilon_random"]
    assert summary.loc["epsilon_random", "holm_family"] == "sae vs epsilon_random at 1 site/layer"
    assert summary.loc["epsilon_random", "ce_delta_diff"] == comparison.ce_delta_difference.mean
    assert loaded.verdict().startswith(f"At {loaded.report.hook_name} of {loaded.report.model} the SAE's reconstruction")
    assert loaded.plot("kl_bars").axes and loaded.plot("kl_by_position").axes
    with pytest.raises(KlgapError, match="plot 'single_token' does not apply to this all_tokens run"):
        loaded.plot("single_token")
    copy = saved.save(tmp_path / "copy")
    assert klgap.load_run(copy).report == saved.report and (copy / "report.html").is_file()
    # measure(out=DIR) writes what `klgap replicate --out DIR` writes: a folder `klgap validate` accepts, its pages
    assert {"report.json", "tokens.parquet", "report.md", "report.html", "kl_bars.png"} <= {
        p.name for p in (tmp_path / "run").iterdir()}
    from klgap.cli.main import main

    assert main(["validate", str(tmp_path / "run")]) == 0


def test_token_ids_and_texts(held):
    hf, tok, sae, _ = held
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    by_ids = klgap.measure(hf, sae, tokenizer=tok, tokens=ids, interventions="sae", progress=False)
    assert by_ids.report.n_contexts == 3 and by_ids.report.context_len == 24 and by_ids.report.n_tokens == 3 * 23
    assert set(by_ids.tokens["token_id"]) <= set(ids[:, 1:].flatten().tolist())
    texts = ["The quick brown fox jumps over the lazy dog. " * 4, "Sparse autoencoders reconstruct activations. " * 4]
    by_text = klgap.measure(hf, sae, tokenizer=tok, tokens=texts, context_len=32, interventions="sae", progress=False)
    n_bytes = sum(len(t.encode()) for t in texts) + 1  # the byte tokenizer: one token per byte, one separator
    assert by_text.report.n_contexts == n_bytes // 31


def test_curve_compare_and_train_sae(held, tmp_path):
    hf, tok, sae, _ = held
    curve = klgap.curve(hf, sae, tokenizer=tok, cos="0.6:1.0:3", **{k: v for k, v in RUN.items() if k != "interventions"})
    assert [p.cos for p in curve.report.curve.points] == [0.6, 0.8, 1.0] and curve.plot("robustness").axes
    table = klgap.compare([curve, klgap.measure(hf, sae, tokenizer=tok, **RUN)], labels=["curve", "plain"])
    assert list(table["label"]) == ["curve", "plain"] and table["ratio"].notna().all()
    trained = klgap.train_sae("tiny-gpt2", "mlp_out", 1, tmp_path / "trained", tokens=3000, context_len=32,
                              steps=20, dataset="random", device="cpu", progress=False)
    assert trained.loc[0, "hook_name"] == HOOK and 0 <= trained.loc[0, "l0_mean"] <= 512
    # the model held in memory trains the same SAE as its name (same weights, tokens, seed)
    again = klgap.train_sae(hf, "mlp_out", 1, tmp_path / "held", tokenizer=tok, tokens=3000, context_len=32,
                            steps=20, dataset="random", progress=False)
    numbers = ["explained_variance", "l0_mean", "mse", "n_training_tokens"]
    assert again.loc[0, numbers].tolist() == trained.loc[0, numbers].tolist()


def test_bad_input_raises_the_clis_errors(held):
    hf, tok, sae, _ = held
    from sae_lens import StandardSAE, StandardSAEConfig

    narrow = StandardSAEConfig(d_in=32, d_sae=64, device="cpu", dtype="float32")
    narrow.metadata.hook_name = HOOK
    with pytest.raises(KlgapError, match=r"has d_in=32 but gpt2 mlp_out is 64 wide"):
        klgap.measure(hf, StandardSAE(narrow), tokenizer=tok, **RUN)
    with pytest.raises(KlgapError, match=r"unknown site 'mlp'.*valid: attn_out, attn_z, mlp_in, mlp_out, resid_post, resid_pre"):
        klgap.measure(hf, EncodeDecode(sae), tokenizer=tok, site="mlp", layer=1, **RUN)
    with pytest.raises(KlgapError, match=r"unknown config key 'tokns' \(did you mean 'tokens'\?\)"):
        klgap.measure(hf, sae, tokenizer=tok, tokns=5)

    class Mamba(torch.nn.Module):  # an architecture with no site map whose blocks cannot be found either
        config = type("MambaConfig", (), {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2,
                                          "num_attention_heads": 4, "vocab_size": 257, "max_position_embeddings": 64})()

        def __init__(self):
            super().__init__()
            self.mixer = torch.nn.Linear(64, 64)

    with pytest.raises(KlgapError, match=r"cannot find the decoder blocks of Mamba: expected one ModuleList") as refused:
        klgap.measure(Mamba(), sae, **RUN)
    from klgap_hf.loaded import wrap_loaded  # the CLI's path for a folder or repo: the same words

    with pytest.raises(KlgapError) as cli_words:
        wrap_loaded("mamba", Mamba(), None, torch.device("cpu"), torch.float32)
    assert str(refused.value) == str(cli_words.value)
    with pytest.raises(KlgapError, match=r"no model adapter knows model 'object'"):
        klgap.measure(object(), sae, **RUN)


def test_a_result_shows_itself_compares_by_value_and_names_its_held_model(held):
    """Issue 35: a short repr and an HTML display, value equality, name= for a held model, Python's words."""
    hf, tok, sae, _ = held
    first = klgap.measure(hf, sae, tokenizer=tok, **RUN)
    text = repr(first)
    lines = text.splitlines()
    assert lines[0] == ("klgap.Result: gpt2 · blocks.1.hook_mlp_out · all_tokens · 248 tokens (8 contexts), "
                        "3 interventions, in memory (result.save(FOLDER) writes its folder)")
    assert lines[1] == first.verdict() and lines[2].split() == ["site/layer", "KL", "sae", "KL", "epsilon_random",
                                                                "ratio", "[95%", "CI]", "Wilcoxon", "p"]
    assert lines[3].startswith("mlp_out L1") and first.ratio and f"{first.ratio.ratio:.3f}" in lines[3]
    assert len(lines) == 5 and len(text) < 1000  # the finding and the key table, not the report
    html = first._repr_html_()
    assert html.startswith('<div class="klgap-result"><style>.klgap-result{') and "body{" not in html
    assert "<h3>klgap report: gpt2 · blocks.1.hook_mlp_out · all_tokens</h3>" in html and '<p class="lead">' in html
    assert html.count("data:image/png;base64,") == 3 and first._repr_html_() is html  # drawn once
    # value equality: the same measurement is equal wherever it lives; a Result is not hashable (it is mutable)
    same = klgap.Result(first.report.model_copy(deep=True), first.tokens.copy(), path=None)
    again = klgap.measure(hf, sae, tokenizer=tok, **RUN)
    # a repeated run is the same measurement (provenance, when it ran, is not part of the value); another seed is not
    assert first == same and first == again and first != "a result" and (first != again) is False
    assert first.report.interventions == again.report.interventions
    other = klgap.measure(hf, sae, tokenizer=tok, **{**RUN, "seed": RUN["seed"] + 1})
    assert first != other and first.report.n_tokens == other.report.n_tokens
    with pytest.raises(TypeError, match="unhashable"):
        hash(first)
    # name= names a held model in the report, its tokens and compare; unnamed twins get distinct labels
    named = klgap.measure(hf, sae, tokenizer=tok, name="tiny-a", **RUN)
    assert named.report.model == "tiny-a" and set(named.tokens["model"]) == {"tiny-a"}
    assert list(klgap.compare([first, again, named])["label"]) == ["gpt2 mlp_out L1 #1", "gpt2 mlp_out L1 #2",
                                                                   "tiny-a mlp_out L1"]
    with pytest.raises(KlgapError, match=r"name='x' names a model object you hold; model='tiny-gpt2' is already"):
        klgap.measure("tiny-gpt2", sae, name="x", **RUN)
    with pytest.raises(KlgapError, match=r"name= must be a non-empty string"):
        klgap.measure(hf, sae, tokenizer=tok, name=" ", **RUN)
    # a held model without its tokenizer: the message names Python's arguments, not the CLI's flags
    with pytest.raises(KlgapError) as no_tokenizer:
        klgap.measure(hf, sae, **{**RUN, "dataset": "sample"})
    assert str(no_tokenizer.value) == ("model gpt2 has no tokenizer, so text cannot be tokenized: pass tokenizer=..., "
                                       "token ids as tokens=<[n_contexts context_len] LongTensor>, or dataset='random'")


def test_old_config_keys_migrate_in_one_place():
    from klgap.plan.config import RunConfig

    with pytest.warns(DeprecationWarning, match="config key 'n_tokens' is deprecated: write tokens = 512"):
        config = RunConfig.from_dict({"model": "tiny-gpt2", "n_tokens": 512, "prepend_bos": False})
    assert (config.tokens, config.no_bos) == (512, True)
    with pytest.raises(KlgapError, match="config key 'n_tokens' is the old name of 'tokens', and both are given"):
        RunConfig.from_dict({"model": "tiny-gpt2", "n_tokens": 512, "tokens": 1024})
    with pytest.raises(TypeError):  # the dataclass itself takes the flags' names only (README: Config files)
        RunConfig(model="tiny-gpt2", n_tokens=512)
