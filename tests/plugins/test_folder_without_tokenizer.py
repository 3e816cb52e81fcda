"""A model folder saved by ``save_pretrained`` alone (config and weights, no tokenizer files), for every mapped
family: no tokenizer is loaded (transformers 5 would build an empty one of 1-2 special tokens for GPT-2, GPT-NeoX,
Qwen2, ...), `--dataset random` draws from the model's whole vocabulary, a text source fails with one line naming
the missing files, and `klgap models FOLDER` and the run's notes say the folder has no tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.plugins.manager import model_adapter, registry
from klgap.plan.sites import hook_name
from klgap_hf.families import FAMILIES
from klgap_hf.tokenizer import folder_tokenizer, tokenizer_files
from tests.helpers import random_sae
from tests.plugins.hf_families import tiny_folder

MISSING = "holds no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
_FOLDERS: dict[str, object] = {}


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory):
    """``bare_folder("gpt2")`` -> the tiny model saved without a tokenizer, written once per module."""
    root = tmp_path_factory.mktemp("bare")

    def _get(family: str):
        if family not in _FOLDERS:
            _FOLDERS[family] = tiny_folder(family, root, tokenizer=False)
        return _FOLDERS[family]

    return _get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_draws_from_the_whole_vocabulary_and_text_names_the_missing_files(family, bare_folder):
    folder = bare_folder(family)
    assert tokenizer_files(folder) == []
    model = model_adapter(str(folder)).adapter.load(torch.device("cpu"), torch.float32)
    assert model.tokenizer is None and model.bos_token_id == 256  # BOS from the config, not an empty tokenizer's 0
    assert model.tokenizer_note.startswith(f"the folder {str(folder)!r} {MISSING}: token ids only")
    ids = registry("token_source").get("random").contexts(model, 64, 32, 0, True, None)  # [64 32]
    drawn = ids[:, 1:]
    assert ids[:, 0].eq(256).all() and not drawn.eq(256).any()
    assert 0 <= int(drawn.min()) and int(drawn.max()) < model.vocab_size  # 257 (gemma3: 260)
    assert int(drawn.max()) > model.vocab_size // 2 and drawn.unique().numel() > model.vocab_size // 2
    with pytest.raises(KlgapError) as raised:
        registry("token_source").get("sample").contexts(model, 4, 32, 0, True, None)
    assert str(raised.value).startswith(f"model {family} cannot tokenize text: the folder {str(folder)!r} {MISSING}")
    assert "\n" not in str(raised.value)


def test_tokenizer_files_that_make_an_empty_tokenizer_are_no_tokenizer(tmp_path, bare_folder):
    """GPT-2's vocab.json + merges.txt holding nothing: transformers builds a GPT2Tokenizer of 1 token."""
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(bare_folder("gpt2"), folder)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer, note = folder_tokenizer(folder)
    assert tokenizer is None
    assert note.startswith("the folder's tokenizer files (merges.txt, vocab.json) make an empty GPT2Tokenizer "
                           "(1 special tokens, no vocabulary): token ids only")


def test_the_commands_say_the_folder_has_no_tokenizer(tmp_path, bare_folder, capsys):
    """`klgap models FOLDER`; a `--dataset random` run (its notes); a text run: exit 2, one line, no folder left."""
    folder = str(bare_folder("gpt2"))
    assert main(["models", folder]) == 0
    assert f"tokenizer: none — the folder {folder!r} {MISSING}: token ids only" in capsys.readouterr().out
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, hook_name("mlp_out", 1), seed=1)
    run = ["replicate", "--model", folder, "--sae", str(sae), "--tokens", "64", "--context-len", "16",
           "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert main([*run, "--dataset", "random", "--out", str(tmp_path / "random")]) == 0
    report = json.loads((tmp_path / "random" / "report.json").read_text())
    assert any(note.startswith(f"the folder {folder!r} {MISSING}") for note in report["notes"])
    capsys.readouterr()
    assert main([*run, "--dataset", "sample", "--out", str(tmp_path / "text")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]  # its bar
    assert len(lines) == 1 and not (tmp_path / "text").exists()
    assert lines[0].startswith(f"klgap: error: model gpt2 cannot tokenize text: the folder {folder!r} {MISSING}")
