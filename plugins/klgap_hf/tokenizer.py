"""A byte-level tokenizer that needs no download: ids 0..255 are the UTF-8 bytes, 256 is BOS/EOS."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


def byte_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is one token; id 256 is BOS and EOS.

    ``tok("Hi")["input_ids"] == [72, 105]`` (no BOS added) and ``tok.decode`` round-trips text.
    """
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    vocab[BOS] = BOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, model_max_length=model_max_length
    )
