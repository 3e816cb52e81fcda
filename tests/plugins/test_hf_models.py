"""Model adapters: every site of every tiny model resolves to what a plain PyTorch hook sees."""

from __future__ import annotations

import os

import pytest
import torch

from klgap import activations
from klgap.errors import HubUnavailableError, KlgapError
from klgap.plugins import registry
from klgap.sites import SITES

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


def test_every_site_matches_a_plain_hook(tiny_model):
    ids = IDS.to(tiny_model.device)
    for site in SITES:
        for layer in range(tiny_model.n_layers):
            spec = tiny_model.site_map(site, layer)
            got = activations.collect(tiny_model, spec, ids)
            assert got.shape == (2, 12, tiny_model.site_widths[site]), (site, layer)
            expected, _ = _hooked(tiny_model, spec, ids)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


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


def test_hub_models_fail_fast_offline(monkeypatch, device):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("gpt2", "pythia-70m-deduped"):
        with pytest.raises(HubUnavailableError, match=f"needs the Hugging Face hub"):
            registry("model").get(name).load(device, torch.float32)


def test_unknown_architecture():
    from klgap_hf.families import family_for

    with pytest.raises(KlgapError, match=r"model type 'mamba' is not supported; supported: gemma3_text, gpt2, gpt_neox, llama"):
        family_for("mamba")


def test_pythia_70m_points_to_the_deduped_saes():
    from klgap_saes.pretrained import SaeLensPretrainedLoader
    from tests.helpers import FakeModel

    model = FakeModel(sae_lens_models=("pythia-70m", "pythia-70m-deduped"), info={"sae_note": "deduped is used"})
    spec, note = SaeLensPretrainedLoader().default_sae(model, "mlp_out", 0)
    assert spec == "pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out"
    assert "deduped is used" in note


@pytest.mark.slow
def test_smollm2_offline(device):
    model = registry("model").get("smollm2-135m").load(device, torch.float32)
    assert (model.n_layers, model.d_model, model.vocab_size) == (30, 576, 49152)
    ids = model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        logits = model.hf_model(input_ids=ids, use_cache=False).logits
    assert model.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    for site in SITES:
        spec = model.site_map(site, 15)
        expected, plain = _hooked(model, spec, ids)
        acts, clean = activations.run_clean(model, spec, ids)
        torch.testing.assert_close(acts, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(clean, plain, rtol=0, atol=1e-5)
