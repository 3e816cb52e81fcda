"""The built-in plugins pass the same conformance suites a third-party plugin author runs (klgap.testing)."""

from __future__ import annotations

import torch

from klgap.testing import (ModelAdapterConformance, PerturbationConformance, SAELoaderConformance,
                           TokenSourceConformance)
from klgap_saes import save_safetensors_sae

# ----------------------------------------------------------------------------- model adapters


class TestTinyGPT2(ModelAdapterConformance):
    model = "tiny-gpt2"


class TestTinyPythia(ModelAdapterConformance):
    model = "tiny-pythia"


class TestTinyLlama(ModelAdapterConformance):
    model = "tiny-llama"


class TestQwen2Folder(ModelAdapterConformance):
    """A folder saved with save_pretrained, as `--model ./folder` takes it (the suite is not for registered names only)."""

    def make_model(self, tmp_path_factory):
        from tests.plugins.hf_families import tiny_folder

        return str(tiny_folder("qwen2", tmp_path_factory.mktemp("conformance")))


# ----------------------------------------------------------------------------- SAE loaders


def _weights(d_in=64, d_sae=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=gen) / d_in**0.5
    return 2.0 * W_dec.T.contiguous(), W_dec, torch.zeros(d_sae), torch.zeros(d_in)


class TestSafetensorsLoader(SAELoaderConformance):
    loader = "safetensors"
    expected_hook = "blocks.1.hook_mlp_out"

    def make_spec(self, tmp_path):
        return str(save_safetensors_sae(tmp_path / "sae.safetensors", *_weights(), hook_name=self.expected_hook))


class TestSaeLensFolderLoader(SAELoaderConformance):
    loader = "sae_lens_disk"
    expected_hook = "blocks.0.hook_resid_pre"

    def make_spec(self, tmp_path):
        from sae_lens import StandardSAE, StandardSAEConfig

        cfg = StandardSAEConfig(d_in=64, d_sae=256, dtype="float32", device="cpu")
        cfg.metadata.hook_name = self.expected_hook
        sae = StandardSAE(cfg)
        W_enc, W_dec, b_enc, b_dec = _weights()
        sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec})
        sae.save_model(str(tmp_path / "sae"))
        return str(tmp_path / "sae")


class TestSparsifyLoader(SAELoaderConformance):
    """A folder as EleutherAI sparsify's SparseCoder.save_to_disk writes it, named after its hookpoint."""

    loader = "sparsify"
    expected_hook = "blocks.1.hook_mlp_out"

    def make_spec(self, tmp_path):
        import json

        from safetensors.torch import save_file

        W_enc, W_dec, b_enc, b_dec = _weights()
        folder = tmp_path / "layers.1.mlp"
        folder.mkdir()
        save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
                  str(folder / "sae.safetensors"))
        (folder / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 256, "k": 16,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 64,
        }))
        return str(folder)


class TestDictionaryLearningLoader(SAELoaderConformance):
    """A trainer folder as dictionary_learning's trainSAE writes it (an AutoEncoderTopK)."""

    loader = "dictionary_learning"
    expected_hook = "blocks.0.hook_resid_post"

    def make_spec(self, tmp_path):
        import json

        W_enc, W_dec, b_enc, b_dec = _weights()
        folder = tmp_path / "trainer_0"
        folder.mkdir()
        torch.save({"k": torch.tensor(16, dtype=torch.int), "threshold": torch.tensor(-1.0), "decoder.weight": W_dec.T,
                    "encoder.weight": W_enc.T, "encoder.bias": b_enc, "b_dec": b_dec}, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {
            "trainer_class": "TopKTrainer", "dict_class": "AutoEncoderTopK", "activation_dim": 64, "dict_size": 256,
            "k": 16, "layer": 0, "lm_name": "tiny-gpt2", "submodule_name": "resid_post_layer_0",
        }}))
        return str(folder)


# ----------------------------------------------------------------------------- perturbations

SPECS = [
    "sae", "sae_norm_corrected", "sae_norm", "error_add", "epsilon_random", "theta_random", "theta_random:norm=x",
    "theta_random_xnorm", "cosine_matched", "cosine_matched:cos=0.5,norm_frac=0.9", "cosine_matched:cos=-0.3",
    "identity", "zero", "mean_ablation", "mean_ablation:over=run", "mean_ablation:over=batch64", "epsilon_anisotropic", "sae_error_shuffled",
    "sae_plus_linear_error", "sae_plus_nonlinear_error", "epsilon_random_nonlinear", "epsilon_random_linear",
    "cov_random_mixture", "cov_random_mixture:origin=x", "real_direction", "real_direction:origin=x",
    "epsilon_error_cov", "epsilon_mahalanobis", "epsilon_mahalanobis:ridge=0.5", "pca_matched", "random_dictionary",
    "random_dictionary:seed=3", "sae_minus_offset",
    "along", "along:t=0.5", "along:dir=epsilon_random,t=1.5", "along:dir=cov_random_mixture,t=0.5",
    "along:dir=real_direction,t=2", "along:dir=pca_matched,t=0.7", "along:dir=random_dictionary,t=0.3",
    "along:dir=epsilon_error_cov,t=0",
    "transcoder", "transcoder_norm_corrected", "transcoder_no_skip", "mlp_zero", "mlp_mean_ablation",
    "mlp_mean_ablation:over=run",
]

for _spec in SPECS:
    _name = "TestPerturbation_" + "".join(c if c.isalnum() else "_" for c in _spec)
    globals()[_name] = type(_name, (PerturbationConformance,), {"spec": _spec})


def test_every_registered_perturbation_is_in_the_suite():
    from klgap.plan.specs import parse_intervention
    from klgap.plugins.manager import get_host

    builtin = {name for name, e in get_host().registry("perturbation").entries.items() if e.plugin == "perturbations"}
    assert builtin <= {parse_intervention(s)[0] for s in SPECS}


# ----------------------------------------------------------------------------- token sources


class TestRandomTokens(TokenSourceConformance):
    source = "random"


class TestSampleText(TokenSourceConformance):
    source = "sample"
    arg = "eval"


class TestSampleTextByRole(TokenSourceConformance):
    source = "sample"  # no split named: train-sae reads sample:train, a run sample:eval
