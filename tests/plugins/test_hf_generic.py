"""The generic site map (klgap_hf.generic) of architectures with no hand-written one.

It must find what the hand-written maps say for every mapped family, agree with TransformerLens's hooks on
architectures TransformerLens converts but klgap does not map (GPT-Neo, Phi), and refuse, naming what it found,
what it cannot identify (OPT's flattened MLP, BLOOM's attention that adds the residual itself, Qwen3.5's two kinds
of attention layer, a model whose blocks cannot be found).
"""

from __future__ import annotations

import pytest
import torch

from klgap.forward import activations


from klgap.forward import executors
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.plan.sites import SITES, hook_name
from klgap_hf.families import FAMILIES
from klgap_hf.generic import find_blocks, identify_sublayers, infer_family
from tests.plugins.hf_families import hooked_transformer, tiny_folder, tiny_model
from tests.helpers import run_config

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))


def _generic(model_type: str):
    model = tiny_model(model_type)
    return identify_sublayers(model, infer_family(model, model.config), model.config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generic_map_finds_every_hand_written_map(family):
    found = _generic(family)
    assert found.inferred and found.unmapped == ""
    assert found.points() == FAMILIES[family].points(), family
    assert found.layout() == FAMILIES[family].layout(), family


def _load(model_type: str, tmp_path, dtype=torch.float64):
    from klgap.plugins.manager import model_adapter

    folder = tiny_folder(model_type, tmp_path)
    return model_adapter(str(folder)).adapter.load(torch.device("cpu"), dtype)


@pytest.mark.parametrize(("model_type", "mapped"), [
    ("gpt_neo", SITES),
    ("phi", SITES),
    ("opt", ("resid_pre", "resid_post", "attn_z")),
])
def test_generic_sites_equal_transformer_lens_hooks(model_type, mapped, tmp_path):
    model = _load(model_type, tmp_path)
    assert model.info["site_map"] == "generic (klgap_hf.generic)"
    tl_model = hooked_transformer(model.hf_model)
    mlp_inputs: dict[int, torch.Tensor] = {}  # mlp_in: what TransformerLens's MLP component reads (ln2's output)
    handles = [block.mlp.register_forward_pre_hook(lambda _m, args, layer=layer: mlp_inputs.__setitem__(layer, args[0]))
               for layer, block in enumerate(tl_model.blocks)]
    with torch.no_grad():
        tl_logits, cache = tl_model.run_with_cache(IDS)
        assert (tl_logits - model.hf_model(input_ids=IDS, use_cache=False).logits).abs().max() < 1e-5
    for handle in handles:
        handle.remove()
    for layer in range(model.n_layers):
        for site in mapped:
            ours = activations.collect(model, model.site_map(site, layer), IDS)
            theirs = mlp_inputs[layer] if site == "mlp_in" else cache[hook_name(site, layer)]
            theirs = theirs.flatten(-2) if site == "attn_z" else theirs
            assert (ours - theirs).abs().max() < 1e-5, (model_type, site, layer)
    for site in set(SITES) - set(mapped):
        with pytest.raises(KlgapError, match=rf"site '{site}' is not mapped for model type '{model_type}': .*"
                                             r"submodule calls: self_attn_layer_norm, self_attn, final_layer_norm"):
            model.site_map(site, 0)


def test_generic_fast_paths_and_a_run(tmp_path):
    """An unmapped model runs end to end on the generic map, with both fast paths."""
    from tests.helpers import random_sae

    model = _load("gpt_neo", tmp_path, torch.float32)
    contexts = torch.cat([IDS, IDS.flip(1)])
    for site in SITES:
        for mode, path in (("all_tokens", "suffix-replay"), ("single_token", "kv-cache")):
            config = RunConfig(model="gpt_neo", site=site, layer=1, mode=mode, position=9, k=2, context_len=16,
                               tokens=64, batch_size=2, dataset="random")
            assert executors.choose(config, model, model.site_map(site, 1), 1, contexts)[1]["path"] == path
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, "blocks.1.hook_mlp_out")
    report = run_config(RunConfig(model=str(tmp_path / "gpt_neo"), sae=str(sae), tokens=64, context_len=16,
                                  batch_size=2, dataset="random", device="cpu"), tmp_path / "run", progress=False)
    assert report.execution["path"] == "suffix-replay" and report.kl_ratio_sae_over_epsilon_random > 0


def test_bloom_attention_adds_the_residual_itself_so_only_the_residual_stream_is_mapped(tmp_path):
    model = _load("bloom", tmp_path, torch.float32)
    assert model.site_map("resid_post", 1).index == 0  # BLOOM's blocks return a tuple
    post = activations.collect(model, model.site_map("resid_post", 0), IDS)
    pre = activations.collect(model, model.site_map("resid_pre", 1), IDS)
    assert torch.equal(post, pre)
    for site in ("attn_out", "mlp_out"):
        with pytest.raises(KlgapError, match=r"no pair of transformer\.h\.0's submodule outputs add up to its output "
                                             r"− input \(submodule calls: input_layernorm, self_attention, "
                                             r"post_attention_layernorm, mlp\)"):
            model.site_map(site, 1)


def test_hybrid_layers_map_only_what_every_kind_of_block_shares(tmp_path):
    """Qwen3.5: Gated DeltaNet layers 0-2 and a full-attention layer 3 share the MLP but not the attention."""
    model = _load("qwen3_5_text", tmp_path, torch.float32)
    assert model.site_map("mlp_out", 3).module == "model.layers.3.mlp"
    with pytest.raises(KlgapError, match=r"attn_out differs between the kinds of block \(layers 0,1,2: linear_attn "
                                         r"output; layers 3: self_attn output\[0\]\)"):
        model.site_map("attn_out", 3)
    acts = activations.collect(model, model.site_map("mlp_out", 2), IDS)
    assert acts.shape == (2, 16, 64)


def test_blocks_that_cannot_be_found_are_named():
    model = tiny_model("llama")
    with pytest.raises(KlgapError, match=r"cannot find the decoder blocks of LlamaForCausalLM: expected one ModuleList "
                                         r"of num_hidden_layers=3 blocks of one class, found none; ModuleLists: "
                                         r"model\.layers \(2 × LlamaDecoderLayer\)"):
        find_blocks(model, 3)
