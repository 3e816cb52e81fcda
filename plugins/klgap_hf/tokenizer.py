"""Tokenizers: a byte-level one that needs no download (ids 0..255 are the UTF-8 bytes, 256 is BOS/EOS), and
loading a model's own tokenizer faithfully to its tokenizer.json (:func:`load_tokenizer`)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger("klgap")

BOS = "<|endoftext|>"
BOS_ID = 256
VOCAB_SIZE = 257


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in character for each byte 0..255 (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return tuple(symbols[b] for b in range(256))


def byte_tokenizer(model_max_length: int = 256) -> Any:
    """Byte-level BPE with no merges (a ``PreTrainedTokenizerFast``): every UTF-8 byte is one token; id 256 is
    BOS and EOS.

    ``tok("Hi")["input_ids"] == [72, 105]`` (no BOS added) and ``tok.decode`` round-trips text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # lazy: `import klgap_hf` stays light
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab[BOS] = BOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, model_max_length=model_max_length
    )


#: Text the two tokenizers of a model folder must split identically (spaces, accents, code, digits).
PROBE = "Hello, world!  Ünïcödé façade naïve —\n\tdef f(x): return x + 1  # 123 4567 <b>ok</b>"


def load_tokenizer(source: str, local_files_only: bool = True) -> tuple[Any, str]:
    """A model's own tokenizer, faithful to its ``tokenizer.json``: ``(tokenizer, note)``.

    transformers 5 picks the tokenizer class from the model type (e.g. ``Qwen2Tokenizer`` for any Qwen2 folder)
    and that class may rebuild the pre-tokenizer, so a folder whose ``tokenizer.json`` was written by another
    class tokenizes differently (or fails to load). Both ``AutoTokenizer`` and the plain ``tokenizer.json``
    tokenizer are loaded; when they split :data:`PROBE` differently, or ``AutoTokenizer`` fails, the plain one is
    used and `note` says so. Raises what ``AutoTokenizer`` raised when neither loads (no tokenizer, not cached).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = plain = None
    auto_error: Exception | None = None
    try:
        auto = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - a missing file, a class that cannot read this tokenizer.json, ...
        auto_error = exc
    try:
        plain = PreTrainedTokenizerFast.from_pretrained(source, local_files_only=local_files_only)
    except Exception:  # noqa: BLE001 - no tokenizer.json (e.g. a sentencepiece-only repo)
        plain = None
    if plain is None:
        if auto is None:
            raise auto_error  # type: ignore[misc]
        return auto, ""
    if auto is None:
        return _plain(plain, f"AutoTokenizer failed ({type(auto_error).__name__}: {str(auto_error)[:120]})")
    try:
        same = auto(PROBE, add_special_tokens=False)["input_ids"] == plain(PROBE, add_special_tokens=False)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - e.g. a class that needs an unknown token this vocabulary lacks
        return _plain(plain, f"{type(auto).__name__} (transformers' pick for this model type) cannot tokenize with "
                             f"the folder's tokenizer.json ({type(exc).__name__})")
    if same:
        return auto, ""
    return _plain(plain, f"{type(auto).__name__} (transformers' pick for this model type) splits text differently "
                         "from the folder's tokenizer.json")


#: the files a tokenizer is built from (tokenizer_config.json and special_tokens_map.json alone hold no vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
NAMED_FILES = "tokenizer.json, tokenizer.model, or vocab.json + merges.txt"


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files `folder` holds (:data:`TOKENIZER_FILES` and ``*.tiktoken``), by name."""
    return sorted({p.name for p in folder.iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".tiktoken"})


def is_empty(tokenizer: Any) -> bool:
    """A tokenizer with no token besides its special ones: what transformers 5 builds for some model types (GPT-2,
    GPT-NeoX, Qwen2: ``GPT2Tokenizer`` of length 1) from a folder without vocabulary files, instead of raising."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids))


def folder_tokenizer(folder: Path) -> tuple[Any | None, str]:
    """The tokenizer of a model folder saved with ``save_pretrained``, and what a reader should know about it:
    ``(tokenizer, note)`` (note "" when nothing is to say), or ``(None, why)`` when the folder holds no tokenizer
    files, its files do not load, or they load as an empty tokenizer (:func:`is_empty`): such a folder serves
    token-id sources (``--dataset random``, from the model's whole vocabulary) and no text source."""
    held = tokenizer_files(folder)
    if not held:
        return None, _absent(f"the folder {str(folder)!r} holds no tokenizer files ({NAMED_FILES})")
    try:
        tokenizer, note = load_tokenizer(str(folder))
    except Exception as exc:  # noqa: BLE001 - files a tokenizer class cannot read: token ids only
        return None, _absent(f"the folder's tokenizer files ({', '.join(held)}) do not load "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    if is_empty(tokenizer):
        return None, _absent(f"the folder's tokenizer files ({', '.join(held)}) make an empty "
                             f"{type(tokenizer).__name__} ({len(tokenizer)} special tokens, no vocabulary)")
    return tokenizer, note


def _absent(why: str) -> str:
    return (f"{why}: token ids only (--dataset random draws from the model's whole vocabulary); text sources need "
            "the model's tokenizer saved in the folder (tokenizer.save_pretrained(FOLDER))")


def _plain(tokenizer: Any, why: str) -> tuple[Any, str]:
    note = f"{why}; tokenizer.json loaded as written"
    log.warning("tokenizer: %s", note)
    return tokenizer, note
