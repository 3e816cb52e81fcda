"""The dictionary_learning loader on folders written the way dictionary_learning writes them, against its own math.

The files are made without importing dictionary_learning (not a dependency): `trainSAE` (dictionary_learning/
training.py) writes `config.json` = `{"trainer": trainer.config, "buffer": data.config}` and
`t.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, "ae.pt")`. The state_dict keys and forward
passes below are copied from dictionary_learning/dictionary.py (AutoEncoder, AutoEncoderNew, GatedAutoEncoder,
JumpReluAutoEncoder) and dictionary_learning/trainers/top_k.py, batch_top_k.py, matryoshka_batch_top_k.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from klgap.plan.config import RunConfig
from klgap.job.loading import load_sae
from klgap.errors import KlgapError
from klgap_dictionary_learning import DICT_CLASSES, hook_name_for_submodule
from tests.helpers import run_config

CPU = torch.device("cpu")
D, S = 32, 128  # activation_dim, dict_size

TRAINER_CLASS = {
    "AutoEncoder": "StandardTrainer", "AutoEncoderNew": "StandardTrainerAprilUpdate", "AutoEncoderTopK": "TopKTrainer",
    "BatchTopKSAE": "BatchTopKTrainer", "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
    "JumpReluAutoEncoder": "JumpReluTrainer", "GatedAutoEncoder": "GatedSAETrainer",
}


def dl_state(dict_class: str, d: int = D, f: int = S, k: int = 8, threshold: float = 0.3, seed: int = 0) -> dict:
    """A state_dict with dictionary_learning's key names (nn.Linear weights are [out, in])."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: scale * torch.randn(*shape, generator=gen)  # noqa: E731
    enc, dec = randn(f, d, scale=d**-0.5), randn(d, f, scale=f**-0.5)
    if dict_class == "AutoEncoder":
        return {"bias": randn(d), "encoder.weight": enc, "encoder.bias": randn(f, scale=0.1), "decoder.weight": dec}
    if dict_class == "AutoEncoderNew":
        return {"encoder.weight": enc, "encoder.bias": randn(f, scale=0.1), "decoder.weight": dec, "decoder.bias": randn(d)}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):  # register_buffer k, threshold come first
        return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold, dtype=torch.float32),
                "decoder.weight": dec, "encoder.weight": enc, "encoder.bias": randn(f, scale=0.1), "b_dec": randn(d)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold, dtype=torch.float32),
                "group_sizes": torch.tensor([f // 4, f // 4, f // 2]), "W_enc": enc.T.contiguous(),
                "b_enc": randn(f, scale=0.1), "W_dec": dec.T.contiguous(), "b_dec": randn(d)}
    if dict_class == "JumpReluAutoEncoder":  # thresholds of both signs: upstream's relu(pre * (pre > t))
        return {"W_enc": enc.T.contiguous(), "b_enc": randn(f, scale=0.1), "W_dec": dec.T.contiguous(),
                "b_dec": randn(d), "threshold": randn(f, scale=0.3)}
    if dict_class == "GatedAutoEncoder":
        return {"decoder_bias": randn(d), "encoder.weight": enc, "r_mag": randn(f, scale=0.2),
                "gate_bias": randn(f, scale=0.1), "mag_bias": randn(f, scale=0.1), "decoder.weight": dec}
    raise ValueError(dict_class)


def dl_config(dict_class: str, d: int = D, f: int = S, k: int = 8, layer: int = 3, submodule: str | None = "auto",
              **extra) -> dict:
    """config.json as trainSAE writes it; the trainer part as the trainers' `config` properties build it."""
    trainer = {
        "dict_class": dict_class, "trainer_class": TRAINER_CLASS[dict_class], "activation_dim": d, "dict_size": f,
        "lr": 1e-3, "steps": 1000, "seed": 0, "device": "cpu", "layer": layer, "lm_name": "EleutherAI/pythia-70m-deduped",
        "wandb_name": "run", "submodule_name": f"resid_post_layer_{layer}" if submodule == "auto" else submodule,
    }
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        trainer["k"] = k
    return {"trainer": {**trainer, **extra}, "buffer": {"d_submodule": d, "io": "out", "n_ctxs": 100, "ctx_len": 128}}


def write_dl(folder, state, config):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in state.items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return folder


def dl_reference(dict_class: str, x: torch.Tensor, sd: dict) -> torch.Tensor:
    """`ae(x)` for each class, in plain torch, as dictionary_learning computes it (encode then decode)."""
    relu = F.relu
    if dict_class == "AutoEncoder":
        f = relu(F.linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
        return F.linear(f, sd["decoder.weight"]) + sd["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(F.linear(x, sd["encoder.weight"], sd["encoder.bias"]))
        return F.linear(f, sd["decoder.weight"], sd["decoder.bias"])
    if dict_class == "AutoEncoderTopK":  # encode(x, use_threshold=False), the default
        post_relu = relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        top = post_relu.topk(int(sd["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post_relu).scatter_(dim=-1, index=top.indices, src=top.values)
        return F.linear(f, sd["decoder.weight"]) + sd["b_dec"]
    if dict_class == "BatchTopKSAE":  # encode(x, use_threshold=True), the default
        post_relu = relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
        f = post_relu * (post_relu > sd["threshold"])
        return F.linear(f, sd["decoder.weight"]) + sd["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":  # all groups active after from_pretrained
        post_relu = relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
        f = post_relu * (post_relu > sd["threshold"])
        return f @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre_jump = x @ sd["W_enc"] + sd["b_enc"]
        f = relu(pre_jump * (pre_jump > sd["threshold"]))
        return f @ sd["W_dec"] + sd["b_dec"]
    if dict_class == "GatedAutoEncoder":
        x_enc = F.linear(x - sd["decoder_bias"], sd["encoder.weight"])
        f = (x_enc + sd["gate_bias"] > 0).float() * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
        return F.linear(f, sd["decoder.weight"]) + sd["decoder_bias"]
    raise ValueError(dict_class)


def _x(n=64, d=D, seed=1):
    return 2.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dict_class", list(DICT_CLASSES))
def test_reconstruction_equals_dictionary_learning(tmp_path, dict_class):
    state = dl_state(dict_class)
    loaded = load_sae(str(write_dl(tmp_path / "trainer_0", state, dl_config(dict_class))), CPU)
    assert (loaded.d_in, loaded.d_sae, loaded.hook_name) == (D, S, "blocks.3.hook_resid_post")
    assert loaded.info["dict_class"] == dict_class and loaded.info["format"] == "dictionary_learning"
    x = _x()
    feats = loaded.encode(x)
    assert 0 < (feats != 0).float().mean() < 1  # sparse, not dead
    torch.testing.assert_close(loaded.decode(feats), dl_reference(dict_class, x, state), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dict_class,threshold", [("BatchTopKSAE", -1.0), ("BatchTopKSAE", 0.0), ("MatryoshkaBatchTopKSAE", -1.0)])
def test_batch_topk_threshold_edge_cases(tmp_path, dict_class, threshold):
    """threshold -1 (never set during training) means plain ReLU upstream; 0 is the boundary."""
    state = dl_state(dict_class, threshold=threshold)
    loaded = load_sae(str(write_dl(tmp_path / "t", state, dl_config(dict_class))), CPU)
    x = _x()
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), dl_reference(dict_class, x, state), atol=1e-5, rtol=0)
    assert ("note" in loaded.info) == (threshold < 0)


def test_activation_is_honoured(tmp_path):
    """TopK keeps at most k latents per token; JumpReLU zeroes everything at or below its threshold."""
    topk = load_sae(str(write_dl(tmp_path / "topk", dl_state("AutoEncoderTopK", k=5), dl_config("AutoEncoderTopK", k=5))), CPU)
    assert ((topk.encode(_x()) != 0).sum(-1) == 5).all() and topk.architecture == "topk"
    state = dl_state("JumpReluAutoEncoder")
    jump = load_sae(str(write_dl(tmp_path / "jump", state, dl_config("JumpReluAutoEncoder"))), CPU)
    feats, pre = jump.encode(_x()), _x() @ state["W_enc"] + state["b_enc"]
    assert jump.architecture == "jumprelu"
    assert ((feats != 0) == ((pre > state["threshold"]) & (pre > 0))).all()
    relu = load_sae(str(write_dl(tmp_path / "relu", dl_state("AutoEncoder"), dl_config("AutoEncoder"))), CPU)
    assert relu.architecture == "standard"


@pytest.mark.parametrize("dict_class", ["AutoEncoder", "AutoEncoderTopK", "JumpReluAutoEncoder"])
def test_kl_equals_the_same_weights_as_a_sae_lens_folder(tmp_path, load_model, dict_class):
    """Done-when: per-token KL of the dictionary == KL of the same weights saved by sae_lens and read back."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    lm = load_model("tiny-gpt2")
    d, f = lm.d_model, 256
    state = dl_state(dict_class, d=d, f=f, k=16, seed=7)
    folder = write_dl(tmp_path / "trainer_0", state, dl_config(dict_class, d=d, f=f, k=16, layer=1,
                                                                    submodule="mlp_out_layer_1"))
    # the same weights as sae_lens holds them, built here by hand: W_enc [d, f], W_dec [f, d]
    if dict_class == "AutoEncoder":
        twin = StandardSAE(StandardSAEConfig(d_in=d, d_sae=f, apply_b_dec_to_input=True))
        weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T, "b_dec": state["bias"]}
    elif dict_class == "AutoEncoderTopK":
        twin = TopKSAE(TopKSAEConfig(d_in=d, d_sae=f, k=16, apply_b_dec_to_input=True))
        weights = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T, "b_dec": state["b_dec"]}
    else:
        twin = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=f, apply_b_dec_to_input=False))
        weights = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    twin.load_state_dict({k: v.contiguous() for k, v in weights.items()})
    twin.cfg.metadata.hook_name = "blocks.1.hook_mlp_out"
    twin.save_model(str(tmp_path / "sae_lens_twin"))
    x = _x(20, d)
    with torch.no_grad():
        torch.testing.assert_close(twin.decode(twin.encode(x)), dl_reference(dict_class, x, state), atol=1e-5, rtol=0)

    kls = []
    for name, sae in (("plugin", f"dictionary_learning:{folder}"), ("twin", str(tmp_path / "sae_lens_twin"))):
        config = RunConfig(model="tiny-gpt2", sae=sae, tokens=4 * 32, context_len=32, batch_size=2, device="cpu",
                           dataset="random", interventions=["sae"])
        report = run_config(config, tmp_path / name, progress=False)
        assert report.hook_name == "blocks.1.hook_mlp_out"
        kls.append(pd.read_parquet(tmp_path / name / "tokens.parquet").query("intervention == 'sae'").kl.to_numpy())
    assert len(kls[0]) == 4 * 31 and kls[0].mean() > 1e-6
    np.testing.assert_allclose(kls[0], kls[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "submodule,layer,expected",
    [
        ("resid_post_layer_3", None, "blocks.3.hook_resid_post"),
        ("mlp_out_layer_0", 0, "blocks.0.hook_mlp_out"),
        ("attn_out_layer_2", 2, "blocks.2.hook_attn_out"),
        ("mlp_out_layer1", None, "blocks.1.hook_mlp_out"),  # released dictionaries' folder names
        ("resid_out_layer4", None, "blocks.4.hook_resid_post"),  # resid_i is the output of layer i
        ("mlp_out", 5, "blocks.5.hook_mlp_out"),
        ("mlp_out", None, None),
        ("embed", None, None),
        (None, 3, None),
        ("gpt_neox.layers.3", 3, None),
    ],
)
def test_hook_name_from_submodule(submodule, layer, expected):
    assert hook_name_for_submodule(submodule, layer) == expected


def test_hook_name_from_folder_and_override(tmp_path):
    state = dl_state("AutoEncoder")
    released = write_dl(tmp_path / "pythia-70m-deduped" / "attn_out_layer2" / "10_32768", state,
                        dl_config("AutoEncoder", submodule=None))
    assert load_sae(str(released), CPU).hook_name == "blocks.2.hook_attn_out"
    assert load_sae(str(write_dl(tmp_path / "x", state, dl_config("AutoEncoder", submodule=None))), CPU).hook_name is None
    pinned = write_dl(tmp_path / "p", state, {**dl_config("AutoEncoder"), "hook_name": "blocks.0.hook_resid_pre"})
    assert load_sae(f"dictionary_learning:{pinned}", CPU).hook_name == "blocks.0.hook_resid_pre"


def test_backup_checkpoint_and_missing_dict_class(tmp_path):
    """ae.pt mid-training is {"step", "ae", "optimizer", ...}; an unnamed dict_class is read off the keys."""
    state = dl_state("JumpReluAutoEncoder")
    folder = write_dl(tmp_path / "t", state, dl_config("JumpReluAutoEncoder"))
    torch.save({"step": 10, "ae": state, "optimizer": {"state": {}, "param_groups": []}, "config": {}, "norm_factor": 1.0},
               folder / "ae.pt")
    x = _x()
    torch.testing.assert_close(load_sae(str(folder), CPU).decode(load_sae(str(folder), CPU).encode(x)),
                               dl_reference("JumpReluAutoEncoder", x, state), atol=1e-5, rtol=0)
    (folder / "config.json").write_text(json.dumps({"trainer": {"layer": 1}}))
    assert load_sae(str(folder), CPU).info["dict_class"] == "JumpReluAutoEncoder"


# ----------------------------------------------------------------------------- bad input


def _expect_error(spec: str, match: str):
    with pytest.raises(KlgapError, match=match):
        load_sae(spec, CPU)


def test_unsupported_dict_class_names_the_supported_ones(tmp_path):
    folder = write_dl(tmp_path / "t", dl_state("AutoEncoder"), {"trainer": {"dict_class": "IdentityDict"}})
    _expect_error(str(folder), r"unsupported dict_class 'IdentityDict'; supported: AutoEncoder, .*JumpReluAutoEncoder")
    folder = write_dl(tmp_path / "u", dl_state("AutoEncoderTopK"), {"trainer": {}})  # TopK or BatchTopK? ambiguous
    _expect_error(str(folder), "names no trainer.dict_class and the keys of ae.pt do not pick one; set it to one of")


def test_missing_and_corrupt_files(tmp_path):
    _expect_error(f"dictionary_learning:{tmp_path / 'nope'}", "does not exist; pass a trainer folder")
    root = tmp_path / "save_dir"
    folder = write_dl(root / "trainer_0", dl_state("AutoEncoder"), dl_config("AutoEncoder"))
    _expect_error(f"dictionary_learning:{root}", r"has no ae.pt.*trainer folders trainer_0: pass one of them")
    (folder / "ae.pt").write_bytes(b"garbage")
    _expect_error(str(folder), "ae.pt is not a readable torch file")
    torch.save([1, 2], folder / "ae.pt")
    _expect_error(str(folder), "does not hold a state_dict of tensors")
    (folder / "config.json").write_text("[")
    _expect_error(str(folder), "config.json is not valid JSON")
    (folder / "config.json").unlink()
    _expect_error(f"dictionary_learning:{folder}", "has no config.json")


@pytest.mark.parametrize(
    "dict_class,state_changes,config_changes,match",
    [
        ("AutoEncoder", {"bias": torch.zeros(D + 1)}, {}, r"bias has shape \(33,\), expected \(32,\)"),
        ("AutoEncoder", {"bias": None}, {}, "ae.pt lacks bias"),
        ("AutoEncoder", {"threshold": torch.zeros(S)}, {}, "unexpected keys threshold; a AutoEncoder state_dict has"),
        ("AutoEncoder", {}, {"dict_size": 64}, "config.json says dict_size=64 but encoder.weight implies 128"),
        ("AutoEncoderTopK", {}, {"k": 9}, "config.json says k=9 but ae.pt holds k=8"),
        ("AutoEncoderTopK", {"k": torch.tensor(0, dtype=torch.int)}, {"k": 0}, "k=0 must be an integer between 1"),
        ("JumpReluAutoEncoder", {"threshold": torch.zeros(S - 1)}, {}, r"threshold has shape \(127,\), expected \(128,\)"),
        ("MatryoshkaBatchTopKSAE", {"group_sizes": torch.tensor([10, 10])}, {}, "group_sizes sum to 20, expected dict_size=128"),
    ],
)
def test_bad_weights_and_configs(tmp_path, dict_class, state_changes, config_changes, match):
    state = {k: v for k, v in {**dl_state(dict_class), **state_changes}.items() if v is not None}
    config = dl_config(dict_class)
    config["trainer"].update(config_changes)
    _expect_error(f"dictionary_learning:{write_dl(tmp_path / 't', state, config)}", match)
