"""The built-in token sources (plugins/klgap_tokens): random, text (txt/jsonl/parquet) and sample."""

from __future__ import annotations

import json
from importlib import resources
from importlib.metadata import entry_points

import pandas as pd
import pytest
import torch

from klgap.errors import KlgapError, PluginError
from klgap.plugins.manager import PluginHost, registry
from klgap.protocols import LoadedModel, TokenSource
from klgap_tokens.packing import pack, tokenize_documents

BOS = 256


def token_registry():
    """The token-source registry from entry points (only our own if another plugin cannot load yet)."""
    try:
        return registry("token_source")
    except PluginError:
        host = PluginHost(load_entry_points=False)
        (ep,) = [e for e in entry_points(group="klgap") if e.name == "token_sources"]
        host.add_plugin(ep.load(), ep.name)
        return host.registry("token_source")


def byte_tokenizer():
    """A byte-level PreTrainedTokenizerFast: id = byte value, <|endoftext|> = 256 (BOS and EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    """tiny-gpt2 when the model plugin provides it, else a stand-in with the same byte-level tokenizer."""
    try:
        return registry("model").get("tiny-gpt2").load(torch.device("cpu"), torch.float32)
    except (PluginError, KlgapError):
        return LoadedModel(
            name="byte-standin", hf_model=torch.nn.Identity(), tokenizer=byte_tokenizer(), n_layers=1, d_model=4,
            site_widths={}, site_map=None, max_context=1024, bos_token_id=BOS, vocab_size=257,
            device=torch.device("cpu"), dtype=torch.float32,
        )


TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, naïvely. " for i in range(60))


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def source(name: str) -> TokenSource:
    return token_registry().get(name)


def body_ids(contexts: torch.Tensor, bos: bool) -> list[int]:
    return contexts[:, 1:].flatten().tolist() if bos else contexts.flatten().tolist()


# --------------------------------------------------------------------------- registration


def test_registered_through_the_entry_point():
    reg = token_registry()
    assert {"random", "text", "sample"} <= set(reg.names())
    for name in ("random", "text", "sample"):
        assert isinstance(reg.get(name), TokenSource)


# --------------------------------------------------------------------------- random


def test_random_shape_bos_and_range(model):
    ctx = source("random").contexts(model, 50, 64, 0, True, None)
    assert ctx.shape == (50, 64) and ctx.dtype == torch.int64
    assert (ctx[:, 0] == model.bos_token_id).all()
    body = ctx[:, 1:]
    assert (body != model.bos_token_id).all() and body.min() >= 0 and body.max() < model.vocab_size
    assert len(body.unique()) > 200  # the whole vocabulary, not a corner of it


def test_random_no_bos_and_determinism(model):
    src = source("random")
    a = src.contexts(model, 20, 32, 3, False, None)
    assert a.shape == (20, 32) and (a != model.bos_token_id).all()
    assert torch.equal(a, src.contexts(model, 20, 32, 3, False, None))
    assert not torch.equal(a, src.contexts(model, 20, 32, 4, False, None))


def test_random_rejects_argument_and_long_context(model):
    with pytest.raises(KlgapError, match="extra"):
        source("random").contexts(model, 2, 8, 0, True, "extra")
    with pytest.raises(KlgapError, match=str(model.max_context + 1)):
        source("random").contexts(model, 2, model.max_context + 1, 0, True, None)


# --------------------------------------------------------------------------- packing


def test_pack_unshuffled_is_consecutive_chunks():
    tokens = torch.arange(100)
    ctx = pack(tokens, 3, 10, BOS, None, "x")
    assert ctx.tolist() == [[BOS, *range(0, 9)], [BOS, *range(9, 18)], [BOS, *range(18, 27)]]
    assert pack(tokens, 2, 10, None, None, "x").tolist() == [list(range(10)), list(range(10, 20))]


def test_pack_shuffle_is_a_seeded_permutation_of_chunks():
    tokens = torch.arange(100)
    every = pack(tokens, 11, 10, BOS, None, "x")  # 99 // 9 = 11 chunks
    shuffled = pack(tokens, 11, 10, BOS, 5, "x")
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, every.tolist()))
    assert not torch.equal(shuffled, every)
    assert torch.equal(shuffled, pack(tokens, 11, 10, BOS, 5, "x"))


def test_pack_not_enough_tokens_says_how_many():
    with pytest.raises(KlgapError) as info:
        pack(torch.arange(50), 10, 10, BOS, 0, "'corpus.txt'")
    message = str(info.value)
    assert "corpus.txt" in message and "50 tokens" in message and "5 contexts" in message and "10" in message


def test_documents_are_joined_with_eos(model):
    tok = model.tokenizer
    ids = tokenize_documents(tok, ["ab", "c"]).tolist()
    assert ids == [*tok("ab", add_special_tokens=False)["input_ids"], tok.eos_token_id, *tok("c", add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------- text


def test_text_contexts_concatenate_back_to_the_text(model, txt):
    tok = model.tokenizer
    n_tokens = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    n = n_tokens // 31
    ctx = source("text").contexts(model, n, 32, 0, True, str(txt))
    assert ctx.shape == (n, 32) and (ctx[:, 0] == model.bos_token_id).all()
    # a seed only reorders whole contexts: sorting them by their position in the text restores it
    ordered = pack(tokenize_documents(tok, [TEXT]), n, 32, model.bos_token_id, None, "x")
    assert sorted(map(tuple, ctx.tolist())) == sorted(map(tuple, ordered.tolist()))
    assert body_ids(ordered, True) == tok(TEXT, add_special_tokens=False)["input_ids"][: n * 31]
    decoded = tok.decode(body_ids(ordered, True)).rstrip("\ufffd")  # the cut may split a UTF-8 character
    assert TEXT.startswith(decoded) and len(decoded) > len(TEXT) - 40


def test_text_no_bos_and_determinism(model, txt):
    src = source("text")
    a = src.contexts(model, 10, 64, 1, False, str(txt))
    assert a.shape == (10, 64) and (a[:, 0] != model.bos_token_id).any()
    assert torch.equal(a, src.contexts(model, 10, 64, 1, False, str(txt)))
    assert not torch.equal(a, src.contexts(model, 10, 64, 2, False, str(txt)))


def test_jsonl_parquet_and_directory_agree(model, tmp_path):
    docs = [f"Document number {i} says something different about item {i * 7}." for i in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pd.DataFrame({"text": docs, "id": range(40)}).to_parquet(tmp_path / "b.parquet")
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "1.txt").write_text(docs[0], encoding="utf-8")
    (folder / "2.txt").write_text(docs[1], encoding="utf-8")
    (folder / ".hidden.txt").write_text("ignored", encoding="utf-8")
    src, bos = source("text"), model.bos_token_id
    tokens = tokenize_documents(model.tokenizer, docs)
    n_all = tokens.numel() // 15  # every chunk, so that shuffling only reorders
    expected = pack(tokens, n_all, 16, bos, None, "x")
    for name in ("a.jsonl", "b.parquet"):
        ctx = src.contexts(model, n_all, 16, 0, True, str(tmp_path / name))
        assert sorted(map(tuple, ctx.tolist())) == sorted(map(tuple, expected.tolist())), name
    eos = model.tokenizer.eos_token_id
    assert eos in body_ids(expected, True)  # documents are separated by EOS
    both = tokenize_documents(model.tokenizer, docs[:2])  # the two files in name order, hidden one skipped
    ctx = src.contexts(model, 1, both.numel(), 0, False, str(folder))
    assert ctx[0].tolist() == both.tolist()
    assert model.tokenizer.decode(ctx[0].tolist(), skip_special_tokens=True) == docs[0] + docs[1]


def write(folder, name: str, data: str | bytes | None):
    """folder/name holding `data` (bytes as is, str as UTF-8); None makes an empty directory."""
    path = folder / name
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    "name,data,expected",
    [
        ("empty.txt", "", "empty"),
        ("blank.txt", "  \n\n ", "empty"),
        ("latin1.txt", "café ".encode("latin-1") * 100, "not UTF-8"),
        ("empty.jsonl", "", "empty"),
        ("bad.jsonl", '{"body": "x"}\n', "no 'text' field"),
        ("broken.jsonl", '{"text": \n', "could not read"),
        ("small.txt", "tiny text", "not enough text"),
        ("d", None, "holds no files"),
    ],
)
def test_text_errors_name_the_path(model, tmp_path, name, data, expected):
    path = write(tmp_path, name, data)
    with pytest.raises(KlgapError) as info:
        source("text").contexts(model, 4, 32, 0, True, str(path))
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_missing_path(model, tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(KlgapError, match="does not exist") as info:
        source("text").contexts(model, 4, 32, 0, True, str(path))
    assert str(path) in str(info.value)


def test_text_too_small_says_what_it_can_make(model, txt):
    with pytest.raises(KlgapError) as info:
        source("text").contexts(model, 10_000, 32, 0, True, str(txt))
    n_tokens = len(model.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert f"{n_tokens:,} tokens" in str(info.value) and f"{n_tokens // 31:,} contexts" in str(info.value)


def test_text_needs_a_path_and_a_short_enough_context(model, txt):
    with pytest.raises(KlgapError, match="text:PATH"):
        source("text").contexts(model, 1, 8, 0, True, None)
    too_long = model.max_context + 1
    with pytest.raises(KlgapError, match=f"context_len {too_long}"):
        source("text").contexts(model, 1, too_long, 0, True, str(txt))


# --------------------------------------------------------------------------- sample


def test_sample_file_ships_with_the_package():
    resource = resources.files("klgap_tokens").joinpath("data", "sample.txt")
    assert resource.is_file()
    text = resource.read_text(encoding="utf-8")
    assert 400_000 <= len(text.encode("utf-8")) <= 600_000
    assert "The " in text[:5000]


def test_sample_yields_1000_contexts_of_128(model):
    ctx = source("sample").contexts(model, 1000, 128, 0, True, None)
    assert ctx.shape == (1000, 128) and (ctx[:, 0] == model.bos_token_id).all()
    text = model.tokenizer.decode(ctx[0, 1:].tolist())
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8  # English prose


def test_sample_too_many_points_to_text(model):
    with pytest.raises(KlgapError, match="text:PATH"):
        source("sample").contexts(model, 100_000, 128, 0, True, None)


def test_sample_train_and_eval_splits_do_not_overlap(model):
    train = source("sample").contexts(model, 200, 64, 0, False, "train")
    evaluation = source("sample").contexts(model, 200, 64, 0, False, "eval")
    train_rows = {tuple(r) for r in train.tolist()}
    assert not train_rows & {tuple(r) for r in evaluation.tolist()}
    with pytest.raises(KlgapError, match=r"eval split.*make (\d|,)+ contexts"):
        source("sample").contexts(model, 100_000, 64, 0, False, "eval")
    with pytest.raises(KlgapError, match="one of train, eval, all, got 'test'"):
        source("sample").contexts(model, 10, 64, 0, False, "test")


def test_hf_source_reads_a_local_dataset_folder_and_says_when_the_hub_is_needed(tmp_path, load_model, monkeypatch):
    """`hf:NAME` streams through datasets.load_dataset: a local folder works offline; a hub id fails at once."""
    import json

    from klgap.errors import HubUnavailableError
    from klgap.plugins.manager import get_host
    from klgap_tokens.packing import tokenize_documents

    lm = load_model("tiny-gpt2")
    source = get_host().registry("token_source").get("hf")
    folder = tmp_path / "ds"
    folder.mkdir()
    docs = [f"Document {i} talks about the number {i} and what follows from it, at some length." * 3 for i in range(200)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ctx = source.contexts(lm, 6, 32, 0, True, f"{folder}:train")
    assert ctx.shape == (6, 32) and (ctx[:, 0] == lm.bos_token_id).all()
    # the same tokens as packing the first documents by hand: the rows come from the documents' token stream
    stream = tokenize_documents(lm.tokenizer, docs).tolist()
    text = ",".join(map(str, stream))
    for row in ctx[:, 1:].tolist():
        assert ",".join(map(str, row)) in text
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"dataset 'Skylion007/openwebtext' needs the Hugging Face hub"):
        source.contexts(lm, 6, 32, 0, True, "Skylion007/openwebtext")
    with pytest.raises(Exception, match=r"needs a dataset"):
        source.contexts(lm, 6, 32, 0, True, None)
