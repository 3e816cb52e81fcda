"""The sparsify loader on folders written the way EleutherAI sparsify writes them, checked against its own math.

The files are made without importing sparsify (not a dependency): `SparseCoder.save_to_disk` (eai-sparsify 1.3.3,
sparsify/sparse_coder.py) writes `save_model(self, "sae.safetensors")` (the module's state_dict: encoder.weight,
encoder.bias, W_dec, b_dec) and `cfg.json` = `{**SparseCoderConfig.to_dict(), "d_in": d_in}`.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from klgap.plan.config import RunConfig
from klgap.job.loading import load_sae
from klgap.errors import KlgapError
from klgap_sparsify import hook_name_for_hookpoint
from tests.helpers import run_config

CPU = torch.device("cpu")


def sparsify_cfg(d_in: int, num_latents: int, k: int, **overrides) -> dict:
    """cfg.json as save_to_disk writes it: every SparseCoderConfig field (sparsify/config.py) plus d_in."""
    cfg = {
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": num_latents,
        "k": k, "multi_topk": False, "skip_connection": False, "transcode": False,
    }
    return {**cfg, **overrides, "d_in": d_in}


def sparsify_state(d_in: int, num_latents: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SparseCoder state_dict with non-trivial biases (b_dec large enough that subtracting it matters)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(num_latents, d_in, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # normalize_decoder
    return {
        "encoder.weight": torch.randn(num_latents, d_in, generator=gen) / d_in**0.5,
        "encoder.bias": 0.1 * torch.randn(num_latents, generator=gen),
        "W_dec": W_dec,
        "b_dec": torch.randn(d_in, generator=gen),
    }


def write_sparsify(folder, state, cfg, dtype=torch.float32):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def sparsify_reference(x: torch.Tensor, sd: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
    """SparseCoder.forward's sae_out, copied from sparsify/sparse_coder.py (encode, decode), fused_encoder.py
    (FusedEncoder.forward) and utils.py (eager_decode), in plain torch."""
    if not cfg["transcode"]:
        x = x - sd["b_dec"]
    preacts = F.relu(F.linear(x, sd["encoder.weight"], sd["encoder.bias"]))
    k = cfg["k"]
    if cfg["activation"] == "topk":
        values, indices = torch.topk(preacts, k, dim=-1, sorted=False)
    else:  # groupmax
        values, indices = preacts.unflatten(-1, (k, -1)).max(dim=-1)
        num_latents = preacts.shape[1]
        indices = torch.arange(0, num_latents, num_latents // k) + indices
    # decoder_impl(top_indices, top_acts, self.W_dec.mT) -> embedding_bag(top_indices, W_dec.mT.mT, ...)
    y = F.embedding_bag(indices, sd["W_dec"], per_sample_weights=values, mode="sum")
    return y + sd["b_dec"]


@pytest.mark.parametrize("activation", ["topk", "groupmax"])
def test_reconstruction_equals_sparsify(tmp_path, activation):
    cfg = sparsify_cfg(32, 128, 8, activation=activation)
    state = sparsify_state(32, 128, seed=1)
    loaded = load_sae(str(write_sparsify(tmp_path / "layers.3", state, cfg)), CPU)
    assert (loaded.d_in, loaded.d_sae, loaded.architecture) == (32, 128, activation)
    assert loaded.info["format"] == "sparsify" and loaded.info["k"] == 8
    x = 2.0 * torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    feats = loaded.encode(x)
    assert ((feats != 0).sum(-1) <= 8).all() and ((feats != 0).sum(-1) > 0).all()
    torch.testing.assert_close(loaded.decode(feats), sparsify_reference(x, state, cfg), atol=1e-5, rtol=0)
    # subtracting b_dec before the encoder changes the result (so the test above checks it)
    assert (loaded.decode(feats) - sparsify_reference(x + state["b_dec"], state, cfg)).abs().max() > 1e-2


def test_groupmax_keeps_one_latent_per_group(tmp_path):
    cfg = sparsify_cfg(16, 64, 4, activation="groupmax")
    loaded = load_sae(str(write_sparsify(tmp_path / "layers.0", sparsify_state(16, 64), cfg)), CPU)
    feats = loaded.encode(torch.randn(20, 16, generator=torch.Generator().manual_seed(0)))
    assert ((feats.unflatten(-1, (4, 16)) != 0).sum(-1) <= 1).all()


def test_expansion_factor_and_bfloat16_weights(tmp_path):
    """num_latents 0 means d_in * expansion_factor; sparsify often saves bfloat16 (loaded here as float32)."""
    cfg = sparsify_cfg(16, 0, 4, expansion_factor=4)
    state = {k: v.to(torch.bfloat16) for k, v in sparsify_state(16, 64).items()}
    loaded = load_sae(str(write_sparsify(tmp_path / "layers.0", state, cfg, dtype=torch.bfloat16)), CPU)
    assert loaded.d_sae == 64 and loaded.info["stored_dtype"] == "torch.bfloat16"
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    ref = sparsify_reference(x, {k: v.float() for k, v in state.items()}, cfg)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "hookpoint,expected",
    [
        ("layers.6", "blocks.6.hook_resid_post"),
        ("layers.6.mlp", "blocks.6.hook_mlp_out"),
        ("layers.6.self_attn", "blocks.6.hook_attn_out"),
        ("h.2", "blocks.2.hook_resid_post"),
        ("h.2.attn", "blocks.2.hook_attn_out"),
        ("gpt_neox.layers.0.attention", "blocks.0.hook_attn_out"),
        ("model.layers.11.mlp", "blocks.11.hook_mlp_out"),
        ("embed_tokens", None),
        ("layers.6.mlp.down_proj", None),
    ],
)
def test_hook_name_from_hookpoint(hookpoint, expected):
    assert hook_name_for_hookpoint(hookpoint) == expected


def test_hook_name_from_folder_seed_folder_and_cfg(tmp_path):
    state, cfg = sparsify_state(16, 64), sparsify_cfg(16, 64, 4)
    assert load_sae(str(write_sparsify(tmp_path / "layers.1.mlp", state, cfg)), CPU).hook_name == "blocks.1.hook_mlp_out"
    seeded = write_sparsify(tmp_path / "layers.0" / "seed1", state, cfg)  # several init_seeds: HOOKPOINT/seedN
    assert load_sae(str(seeded), CPU).hook_name == "blocks.0.hook_resid_post"
    assert load_sae(str(write_sparsify(tmp_path / "custom", state, cfg)), CPU).hook_name is None
    pinned = write_sparsify(tmp_path / "pinned", state, {**cfg, "hook_name": "blocks.1.hook_resid_pre"})
    assert load_sae(f"sparsify:{pinned}", CPU).hook_name == "blocks.1.hook_resid_pre"


def test_bare_paths_route_to_the_right_loader(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    sparsify_dir = write_sparsify(tmp_path / "layers.0", sparsify_state(16, 64), sparsify_cfg(16, 64, 4))
    assert load_sae(str(sparsify_dir), CPU).info["format"] == "sparsify"
    sae = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))
    sae.save_model(str(tmp_path / "saelens"))
    assert "format" not in load_sae(str(tmp_path / "saelens"), CPU).info  # still the sae_lens folder loader


def test_kl_equals_the_same_weights_as_a_sae_lens_folder(tmp_path, load_model):
    """Done-when: per-token KL of the sparsify SAE == KL of the same weights saved by sae_lens and read back."""
    from sae_lens import TopKSAE, TopKSAEConfig

    lm = load_model("tiny-gpt2")
    cfg = sparsify_cfg(lm.d_model, 256, 16)
    state = sparsify_state(lm.d_model, 256, seed=5)
    folder = write_sparsify(tmp_path / "h.1", state, cfg)  # GPT-2's block 1, output = resid_post

    twin_cfg = TopKSAEConfig(d_in=lm.d_model, d_sae=256, k=16, apply_b_dec_to_input=True)
    twin_cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    twin = TopKSAE(twin_cfg)
    twin.load_state_dict({"W_enc": state["encoder.weight"].T.contiguous(), "b_enc": state["encoder.bias"],
                          "W_dec": state["W_dec"], "b_dec": state["b_dec"]})
    twin.save_model(str(tmp_path / "sae_lens_twin"))
    x = torch.randn(20, lm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twin.decode(twin.encode(x)), sparsify_reference(x, state, cfg), atol=1e-5, rtol=0)

    kls = []
    for name, sae in (("plugin", f"sparsify:{folder}"), ("twin", str(tmp_path / "sae_lens_twin"))):
        config = RunConfig(model="tiny-gpt2", sae=sae, tokens=4 * 32, context_len=32, batch_size=2, device="cpu",
                           dataset="random", interventions=["sae"])
        report = run_config(config, tmp_path / name, progress=False)
        assert report.hook_name == "blocks.1.hook_resid_post"
        kls.append(pd.read_parquet(tmp_path / name / "tokens.parquet").query("intervention == 'sae'").kl.to_numpy())
    assert len(kls[0]) == 4 * 31 and kls[0].mean() > 1e-4
    np.testing.assert_allclose(kls[0], kls[1], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- bad input


def _expect_error(spec: str, match: str):
    with pytest.raises(KlgapError, match=match):
        load_sae(spec, CPU)


def test_missing_folder_and_files(tmp_path):
    _expect_error(f"sparsify:{tmp_path / 'nope'}", "does not exist; pass a hookpoint folder")
    root = tmp_path / "checkpoint"
    write_sparsify(root / "layers.0", sparsify_state(16, 64), sparsify_cfg(16, 64, 4))
    _expect_error(f"sparsify:{root}", r"has no cfg.json.*hookpoint folders layers.0: pass one of them")
    (root / "layers.0" / "sae.safetensors").unlink()
    _expect_error(f"sparsify:{root / 'layers.0'}", "has no sae.safetensors")


def test_corrupt_files(tmp_path):
    folder = write_sparsify(tmp_path / "layers.0", sparsify_state(16, 64), sparsify_cfg(16, 64, 4))
    (folder / "sae.safetensors").write_bytes(b"garbage")
    _expect_error(str(folder), "sae.safetensors is not a readable safetensors file")
    (folder / "cfg.json").write_text("{not json")
    _expect_error(str(folder), "cfg.json is not valid JSON")


@pytest.mark.parametrize(
    "cfg_changes,state_changes,match",
    [
        ({"activation": "relu"}, {}, r"unsupported activation 'relu'; supported: topk, groupmax"),
        ({"transcode": True}, {}, "is a transcoder"),
        ({"skip_connection": True}, {"W_skip": torch.zeros(16, 16)}, "skip connection"),
        ({"k": 100}, {}, "k=100 must be between 1 and num_latents=64"),
        ({"k": 5, "activation": "groupmax"}, {}, r"num_latents \(64\) divisible by k \(5\)"),
        ({"num_latents": 32}, {}, r"encoder.weight has shape \(64, 16\), expected \(32, 16\)"),
        ({}, {"b_dec": torch.zeros(15)}, r"b_dec has shape \(15,\), expected \(16,\)"),
        ({}, {"W_dec": None}, "lacks W_dec"),
        ({"d_in": "16"}, {}, "d_in='16'; it must be a non-negative integer"),
    ],
)
def test_bad_configs_and_weights(tmp_path, cfg_changes, state_changes, match):
    state = {**sparsify_state(16, 64), **state_changes}
    state = {k: v for k, v in state.items() if v is not None}
    folder = write_sparsify(tmp_path / "layers.0", state, {**sparsify_cfg(16, 64, 4), **cfg_changes})
    _expect_error(f"sparsify:{folder}", match)
