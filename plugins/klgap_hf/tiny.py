"""Tiny random-init models (GPT-2, GPT-NeoX, Llama) with the byte tokenizer: no download, for tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from klgap.errors import unknown
from klgap.protocols import LoadedModel, ModelShape
from klgap_hf.families import shape_of
from klgap_hf.loaded import wrap_loaded
from klgap_hf.tokenizer import BOS_ID, VOCAB_SIZE, byte_tokenizer

N_LAYERS, D_MODEL, N_HEADS, CONTEXT = 2, 64, 4, 256
KINDS = ("gpt2", "pythia", "llama")


def tiny_config(kind: str) -> Any:
    """The transformers config of ``tiny-<kind>``: 2 layers, d_model 64, 4 heads, context 256, vocab 257."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": BOS_ID}
    if kind == "gpt2":
        return GPT2Config(
            n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_positions=CONTEXT,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
    if kind == "pythia":
        return GPTNeoXConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
            intermediate_size=4 * D_MODEL, max_position_embeddings=CONTEXT, rotary_pct=0.25,
            attention_dropout=0.0, hidden_dropout=0.0, **common,
        )
    if kind == "llama":
        return LlamaConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D_MODEL, num_attention_heads=N_HEADS, num_key_value_heads=2,
            intermediate_size=2 * D_MODEL, max_position_embeddings=CONTEXT, **common,
        )
    raise unknown("tiny model kind", kind, KINDS)


@dataclass
class TinyAdapter:
    """``tiny-<kind>``: random init from :func:`tiny_config` under a fixed seed; identical weights every load."""

    kind: str  # gpt2 | pythia | llama
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # an unknown kind fails at registration, not at load (transformers not imported)
            raise unknown("tiny model kind", self.kind, KINDS)
        self.description = self.description or (
            f"tiny random {self.kind} ({N_LAYERS} layers, d_model {D_MODEL}, byte tokenizer; for tests, no download)"
        )

    def config(self) -> Any:
        """The model's config (:func:`tiny_config`)."""
        return tiny_config(self.kind)

    def shape(self) -> ModelShape:
        """Layers, longest context and site widths from the config (klgap.ShapedModelAdapter): no weights read."""
        return shape_of(self.config())

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """Build the model in float32 under ``manual_seed(seed)`` (global RNG untouched), then move/cast it."""
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            hf_model = AutoModelForCausalLM.from_config(tiny_config(self.kind), dtype=torch.float32)
        return wrap_loaded(
            f"tiny-{self.kind}", hf_model, byte_tokenizer(CONTEXT), device, dtype, (),
            {"source": f"random init (seed {self.seed})", "tokenizer": "byte-level, BOS/EOS = 256"},
        )
