"""Transcoders (klgap/sae/transcoder.py): substitutes that read mlp_in and write mlp_out.

- klgap's per-token KL of ``transcoder`` equals an independent implementation (plain torch hooks on the HF model:
  the MLP's output replaced by tc(its input)), for a family with a post-MLP norm (Gemma 2) and one without (Llama),
  in all-token and single-token mode;
- a skip transcoder with W_skip = 0 measures exactly as its plain transcoder; ``transcoder_no_skip`` of a skip
  transcoder is the plain transcoder's output;
- a sae_lens-saved SkipTranscoder / JumpReLUTranscoder loads (folder, plain safetensors, object) with outputs
  identical to sae_lens's own forward; a sparsify transcoder folder computes what sparsify's SparseCoder computes;
- ``klgap replicate --sae DIR --interventions transcoder,epsilon_random,...`` runs and reports from the CLI.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import klgap
from klgap.errors import KlgapError
from tests.plugins.hf_families import tiny_folder

IDS = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(3))
POST_MLP = {"gemma2": "post_feedforward_layernorm", "llama": "mlp"}  # the module whose output is mlp_out


def skip_transcoder(d: int, layer: int, seed: int = 0, zero_skip: bool = False, jumprelu: bool = False):
    """A random sae_lens SkipTranscoder (or JumpReLUSkipTranscoder) reading blocks.L.ln2.hook_normalized, whose
    output is far enough from the MLP's to move the logits."""
    from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig, SkipTranscoder,
                                          SkipTranscoderConfig)

    cls, cfg_cls = (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig) if jumprelu else (SkipTranscoder,
                                                                                            SkipTranscoderConfig)
    cfg = cfg_cls(d_in=d, d_sae=4 * d, d_out=d, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = f"blocks.{layer}.ln2.hook_normalized"
    tc = cls(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d, 4 * d, generator=gen) / d**0.5)
        tc.b_enc.copy_(torch.randn(4 * d, generator=gen) * 0.1)
        tc.W_dec.copy_(torch.randn(4 * d, d, generator=gen) / (4 * d) ** 0.5)
        tc.b_dec.copy_(torch.randn(d, generator=gen) * 0.1)
        tc.W_skip.copy_(torch.zeros(d, d) if zero_skip else torch.randn(d, d, generator=gen) * 0.1)
        if jumprelu:
            tc.threshold.copy_(torch.rand(4 * d, generator=gen) * 0.3)
    return tc.eval()


def plain_transcoder(skip):
    """The same transcoder without its skip connection (sae_lens's Transcoder holding its other weights)."""
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(d_in=skip.cfg.d_in, d_sae=skip.cfg.d_sae, d_out=skip.cfg.d_out, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = skip.cfg.metadata.hook_name
    tc = Transcoder(cfg)
    tc.load_state_dict({k: v for k, v in skip.state_dict().items() if k != "W_skip"})
    return tc.eval()


def reference_kl(hf_model, family: str, layer: int, tc, ids: torch.Tensor, positions: slice) -> torch.Tensor:
    """KL(clean ‖ patched) per token ``[b n]`` with the MLP output of `layer` replaced by tc(MLP input) at
    `positions`, written with plain torch hooks on the HF model (no klgap code)."""
    block = hf_model.model.layers[layer]
    seen = {}
    pre = block.mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0]))

    def replace(_m, _args, out):
        new = out.clone()
        x = seen["x"][:, positions]
        new[:, positions] = tc(x.reshape(-1, x.shape[-1]).float()).reshape(x.shape[0], -1, out.shape[-1]).to(out.dtype)
        return new

    with torch.no_grad():
        clean = hf_model(input_ids=ids, use_cache=False).logits.float()
        post = getattr(block, POST_MLP[family]).register_forward_hook(replace)
        try:
            patched = hf_model(input_ids=ids, use_cache=False).logits.float()
        finally:
            post.remove()
    pre.remove()
    log_p, log_q = clean.log_softmax(-1), patched.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tc_families")
    folders = {}

    def _get(family: str):
        if family not in folders:
            folder = tiny_folder(family, root)
            folders[family] = (folder, AutoModelForCausalLM.from_pretrained(folder).eval())
        return folders[family]

    return _get


@pytest.mark.parametrize("family", ["gemma2", "llama"])
@pytest.mark.parametrize("mode", ["all_tokens", "single_token", "many_samples"])
def test_transcoder_kl_equals_a_hook_implementation(family, mode, family_model):
    folder, hf_model = family_model(family)
    tc = skip_transcoder(64, 1)
    result = klgap.measure(str(folder), tc, tokens=IDS, mode=mode, position=5, k=3, context_len=12, batch_size=2,
                           interventions=["transcoder", "epsilon_random"], progress=False, no_fast=mode == "all_tokens",
                           n_samples=4)
    assert result.report.site == "mlp_out" and result.report.layer == 1
    rows = result.tokens
    ours = rows[(rows["intervention"] == "sae")].sort_values(["context", "position"])
    if mode == "all_tokens":
        expected = reference_kl(hf_model, family, 1, tc, IDS, slice(1, None))[:, 1:]  # position 0 not patched
    elif mode == "single_token":
        expected = reference_kl(hf_model, family, 1, tc, IDS[:, :9], slice(5, 6))[:, 5:9]
    else:  # many-samples: the transcoder's own row at position t, and 4 epsilon_random draws per context
        expected = reference_kl(hf_model, family, 1, tc, IDS[:, :6], slice(5, 6))[:, 5:6]
        assert (rows[rows["draw"] >= 0]["intervention"] == "epsilon_random").sum() == 4 * len(IDS)
    got = torch.tensor(ours["kl"].to_numpy()).reshape(expected.shape)
    assert float(expected.mean()) > 1e-3  # the transcoder moves the logits: the comparison can fail
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-6)
    # epsilon_random sits around the true MLP output at the transcoder's error size
    eps = rows[rows["intervention"] == "sae"]["eps"].to_numpy()
    assert (eps > 0).all() and result.report.sae.reads == "blocks.1.ln2.hook_normalized"


def test_the_fast_paths_give_the_full_forwards_numbers(family_model):
    """Suffix replay (all tokens) and KV cache (single token) measure a transcoder as full forwards do."""
    folder, _ = family_model("llama")
    tc = skip_transcoder(64, 1)
    for mode in ("all_tokens", "single_token"):
        runs = [klgap.measure(str(folder), tc, tokens=IDS, mode=mode, position=5, k=2, context_len=12, batch_size=2,
                              interventions=["transcoder", "mlp_zero"], progress=False, no_fast=no_fast).tokens
                for no_fast in (True, False)]
        torch.testing.assert_close(torch.tensor(runs[0]["kl"].to_numpy()), torch.tensor(runs[1]["kl"].to_numpy()),
                                   rtol=1e-4, atol=1e-7)


def test_a_zero_skip_equals_its_plain_transcoder_and_no_skip_drops_the_skip(family_model):
    folder, _ = family_model("llama")
    zero_skip = skip_transcoder(64, 1, zero_skip=True)
    with_skip = skip_transcoder(64, 1)
    kw = dict(tokens=IDS, context_len=12, batch_size=2, progress=False)
    a = klgap.measure(str(folder), zero_skip, interventions=["transcoder"], **kw).tokens
    b = klgap.measure(str(folder), plain_transcoder(zero_skip), interventions=["transcoder"], **kw).tokens
    assert a["kl"].tolist() == b["kl"].tolist() and a["eps"].tolist() == b["eps"].tolist()
    c = klgap.measure(str(folder), with_skip, interventions=["transcoder", "transcoder_no_skip"], **kw).tokens
    d = klgap.measure(str(folder), plain_transcoder(with_skip), interventions=["transcoder"], **kw).tokens
    torch.testing.assert_close(torch.tensor(c[c["intervention"] == "transcoder_no_skip"]["kl"].to_numpy()),
                               torch.tensor(d["kl"].to_numpy()), rtol=1e-5, atol=1e-8)
    assert (c[c["intervention"] == "sae"]["kl"].to_numpy() != d["kl"].to_numpy()).any()  # the skip term matters
    with pytest.raises(KlgapError, match="transcoder_no_skip .* without a skip term"):
        klgap.measure(str(folder), plain_transcoder(with_skip), interventions=["transcoder_no_skip"], **kw)


@pytest.mark.parametrize("jumprelu", [False, True])
def test_a_sae_lens_saved_transcoder_loads_with_sae_lens_outputs(jumprelu, tmp_path):
    from klgap.job.loading import load_sae
    from klgap.sae.file import save_safetensors_sae

    tc = skip_transcoder(64, 1, jumprelu=jumprelu)
    tc.save_model(str(tmp_path / "tc"))
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(9))
    state = tc.state_dict()
    save_safetensors_sae(tmp_path / "tc.safetensors", state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"],
                         threshold=state.get("threshold"), hook_name="blocks.1.ln2.hook_normalized",
                         W_skip=state["W_skip"], hook_name_out="blocks.1.hook_mlp_out")
    with torch.no_grad():
        expected = tc(x)
        for spec in (str(tmp_path / "tc"), str(tmp_path / "tc.safetensors")):
            loaded = load_sae(spec, torch.device("cpu"))
            assert (loaded.reads, loaded.hook_name, loaded.d_out) == ("mlp_in", "blocks.1.hook_mlp_out", 64)
            assert loaded.skip is not None and loaded.architecture.endswith("skip_transcoder")
            assert torch.equal(loaded.reconstruct(x)[0], expected), spec


def test_a_sparsify_transcoder_folder_computes_sparsifys_forward(tmp_path):
    """A folder as sparsify's SparseCoder.save_to_disk writes it (transcode=true, skip_connection=true, hookpoint
    layers.1.mlp), against sparsify's forward written out: top-k of relu(encoder(x)) (no b_dec subtracted),
    decode + b_dec + x @ W_skipᵀ."""
    from safetensors.torch import save_file

    from klgap.job.loading import load_sae

    d, n, k = 16, 64, 5
    gen = torch.Generator().manual_seed(4)
    w = {"encoder.weight": torch.randn(n, d, generator=gen), "encoder.bias": torch.randn(n, generator=gen) * 0.1,
         "W_dec": torch.randn(n, d, generator=gen), "b_dec": torch.randn(d, generator=gen),
         "W_skip": torch.randn(d, d, generator=gen) * 0.1}
    folder = tmp_path / "layers.1.mlp"
    folder.mkdir()
    save_file(w, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                 "num_latents": n, "k": k, "multi_topk": False,
                                                 "skip_connection": True, "transcode": True, "d_in": d}))
    loaded = load_sae(str(folder), torch.device("cpu"))
    assert (loaded.reads, loaded.hook_name) == ("mlp_in", "blocks.1.hook_mlp_out")
    x = torch.randn(30, d, generator=gen)
    pre = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"])
    values, indices = pre.topk(k)
    acts = torch.zeros_like(pre).scatter_(-1, indices, values)
    expected = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(loaded.reconstruct(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_replicate_with_a_saved_skip_transcoder_folder(tmp_path):
    """The CLI end to end on tiny-gpt2 with a sae_lens SkipTranscoder folder: the report records what it reads."""
    from klgap.cli.main import main

    tc = skip_transcoder(64, 1)
    tc.save_model(str(tmp_path / "tc"))
    out = tmp_path / "out"
    code = main(["replicate", "--model", "tiny-gpt2", "--sae", str(tmp_path / "tc"), "--interventions",
                 "transcoder,epsilon_random,transcoder_no_skip,mlp_zero,mlp_mean_ablation", "--tokens", "256",
                 "--context-len", "32", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sae"]["reads"] == "blocks.1.ln2.hook_normalized" and report["sae"]["skip"] is True
    assert report["hook_name"] == "blocks.1.hook_mlp_out"
    assert set(report["interventions"]) == {"sae", "epsilon_random", "transcoder_no_skip", "zero", "mean_ablation"}
    rows = pd.read_parquet(out / "tokens.parquet")
    assert (rows.groupby("intervention")["kl"].mean() > 0).all()
