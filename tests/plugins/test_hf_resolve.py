"""`--model` takes a registered name, a hub repo id or a local folder, in every command and in the Python API;
`klgap models` describes families and models without loading weights; a folder's tokenizer is its tokenizer.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from klgap.cli.main import main
from klgap.errors import HubUnavailableError, KlgapError
from klgap.plugins.manager import model_adapter
from tests.helpers import random_sae
from tests.plugins.hf_families import tiny_folder


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    return tiny_folder("qwen2", tmp_path_factory.mktemp("resolve"))


def test_a_folder_resolves_to_its_adapter(qwen2_folder, monkeypatch):
    from klgap_hf.folder import FolderAdapter

    for spec in (str(qwen2_folder), f"{qwen2_folder}/"):
        ref = model_adapter(spec)
        assert isinstance(ref.adapter, FolderAdapter) and ref.adapter.path == qwen2_folder.resolve()
        assert (ref.name, ref.plugin) == ("qwen2", "hf_models")
    monkeypatch.chdir(qwen2_folder.parent)
    for spec in ("qwen2", "./qwen2"):  # relative, as typed
        assert model_adapter(spec).adapter.path == qwen2_folder.resolve()


def test_bad_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_text("")
    with pytest.raises(KlgapError, match=r"model folder '.*empty' has no config.json \(it holds: weights.bin\); a model "
                                         r"folder is what save_pretrained writes"):
        model_adapter(str(tmp_path / "empty"))
    with pytest.raises(KlgapError, match=r"model folder '\./no-such-folder' does not exist"):
        model_adapter("./no-such-folder")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(KlgapError, match=r"is a file; give the folder that holds config.json"):
        model_adapter(str(tmp_path / "file.txt"))


def test_a_folder_whose_weights_are_missing(tmp_path, qwen2_folder):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((qwen2_folder / "config.json").read_text())
    with pytest.raises(KlgapError, match=r"model folder '.*config-only': cannot load the weights"):
        model_adapter(str(folder)).adapter.load(torch.device("cpu"), torch.float32)


def test_a_repo_id_resolves_to_the_hub_and_fails_fast_offline(monkeypatch):
    from klgap_hf.hub import HubAdapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = model_adapter("EleutherAI/pythia-1b")
    assert isinstance(ref.adapter, HubAdapter) and ref.name == ref.adapter.repo_id == "EleutherAI/pythia-1b"
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError, match=r"model 'EleutherAI/pythia-1b' needs the Hugging Face hub"):
        ref.adapter.load(torch.device("cpu"), torch.float32)
    assert time.perf_counter() - start < 10
    assert model_adapter("google/gemma-2-2b").adapter.sae_lens_models == ("gemma-2-2b",)


def test_an_unknown_name_lists_the_names_and_the_other_forms():
    with pytest.raises(KlgapError, match=r"unknown model .gpt3. \(did you mean .gpt2.\?\); valid: .*tiny-pythia; "
                                         r"or a hub repo id \(ORG/NAME\) "
                                         r"or a folder saved with save_pretrained"):
        model_adapter("gpt3")


def test_the_folder_tokenizer_is_its_tokenizer_json(tmp_path):
    """transformers 5 picks Qwen2Tokenizer for any Qwen2 folder, which rebuilds the pre-tokenizer: a tokenizer.json
    written by another class (here a whitespace BPE) must still split text as written."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    folder = tiny_folder("qwen2", tmp_path)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["Hello world, a façade of tokens. def f(x): return x + 1"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    bpe.save(str(folder / "tokenizer.json"))
    text = "Hello   world,\n a façade  def f(x)"
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto(text, add_special_tokens=False)["input_ids"] != bpe.encode(text).ids  # the bad pick, still there
    model = model_adapter(str(folder)).adapter.load(torch.device("cpu"), torch.float32)
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == bpe.encode(text).ids
    note = model.info["tokenizer_note"]
    assert "Qwen2Tokenizer (transformers' pick for this model type) splits text differently" in note


def test_klgap_models_lists_families_and_prints_a_site_map(qwen2_folder, capsys, tmp_path):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for family in ("gemma2", "gemma3", "qwen3_moe", "gpt_oss", "olmo2", "phi3", "gptj", "mixtral"):
        assert f"  {family} " in listed
    assert main(["models", str(qwen2_folder)]) == 0
    printed = capsys.readouterr().out
    assert "Qwen2ForCausalLM (model type qwen2), 2 layers, d_model 64" in printed
    assert "attn_out    model.layers.{L}.self_attn output[0]  (width 64)" in printed
    assert "attn_z      model.layers.{L}.self_attn.o_proj input  (width 64)" in printed
    gemma = tiny_folder("gemma2", tmp_path)
    assert main(["models", str(gemma), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sites"]["mlp_out"]["module"] == "model.layers.{L}.post_feedforward_layernorm"
    assert info["logit_softcap"] == 30.0 and info["transformer_lens"] == "Gemma2ForCausalLM"
    assert main(["models", "tiny-pythia"]) == 0
    assert "attn_z      gpt_neox.layers.{L}.attention.dense input" in capsys.readouterr().out
    assert main(["models", "./no-such-folder"]) == 2


def test_klgap_models_of_an_unmapped_folder_says_generic(tmp_path, capsys):
    folder = tiny_folder("opt", tmp_path)
    assert main(["models", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "site map generic (klgap_hf.generic)" in printed and "resid_pre   model.decoder.layers.{L} input" in printed
    assert "attn_out    not mapped" in printed
    assert "identified by a check forward pass when the model is loaded" in printed


def test_train_sae_curve_replicate_config_file_with_a_folder(qwen2_folder, tmp_path, capsys):
    """The same folder path in train-sae, curve and a replicate config file."""
    sae = tmp_path / "sae"
    assert main(["train-sae", "--model", str(qwen2_folder), "--site", "mlp_out", "--layer", "1", "--tokens", "2000",
                 "--context-len", "32", "--steps", "20", "--out", str(sae), "--quiet"]) == 0
    assert json.loads((sae / "training.json").read_text())["hook_name"] == "blocks.1.hook_mlp_out"
    assert main(["curve", "--model", str(qwen2_folder), "--sae", str(sae), "--cos", "0.5:1.0:3", "--tokens", "256",
                 "--context-len", "32", "--batch-size", "4", "--out", str(tmp_path / "curve"), "--quiet"]) == 0
    assert len(json.loads((tmp_path / "curve" / "report.json").read_text())["curve"]["points"]) == 3
    random_sae(tmp_path / "z.safetensors", 64, 128, "blocks.0.attn.hook_z")
    config = tmp_path / "run.toml"
    config.write_text(f'model = "{qwen2_folder}"\nsae = "{tmp_path / "z.safetensors"}"\ntokens = 256\n'
                      f'context_len = 32\nbatch_size = 4\ndataset = "random"\nout = "{tmp_path / "run"}"\n')
    assert main(["replicate", "--config", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["model"], report["site"], report["config"]["model"]) == ("qwen2", "attn_z", str(qwen2_folder))
    assert report["plugins"][f"model:{qwen2_folder}"]["plugin"] == "hf_models"


def test_importing_the_plugin_does_not_import_transformers():
    code = "import sys, klgap_hf; print('transformers' in sys.modules, 'tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    assert out.split() == ["False", "False"]


def test_the_default_run_folder_is_one_folder_named_after_the_model(qwen2_folder, tmp_path, monkeypatch):
    """Without --out, a folder or repo id as --model gives runs/<its name>-..., not folders nested along its path."""
    from klgap.job.command import model_slug

    assert model_slug(str(qwen2_folder)) == model_slug(f"{qwen2_folder}/") == "qwen2"
    assert model_slug("EleutherAI/pythia-70m") == "EleutherAI--pythia-70m" and model_slug("tiny-gpt2") == "tiny-gpt2"
    random_sae(tmp_path / "z.safetensors", 64, 128, "blocks.0.attn.hook_z")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["replicate", "--model", str(qwen2_folder), "--sae", str(tmp_path / "z.safetensors"), "--tokens", "64",
                 "--context-len", "32", "--batch-size", "2", "--dataset", "random", "--quiet"]) == 0
    (made,) = (work / "runs").iterdir()
    assert made.name.startswith("qwen2-attn_z-L0-") and (made / "report.json").is_file()
