"""Random-weight models and SAEs for the benchmarks: no download, the same weights every time.

- :func:`gpt2_small_folder`: a GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, d_model 768, vocab 50,257,
  1,024 positions) under a fixed seed, saved with ``save_pretrained`` so ``--model FOLDER`` loads it.
- :func:`random_sae_file`: a random ReLU SAE in the plain safetensors format (W_enc = 2 W_decᵀ, zero biases),
  with its hook name, so ``--sae FILE`` places it.
- :func:`hooked_transformer`: a TransformerLens copy of a Hugging Face GPT-2, weight for weight (TransformerLens's
  own config and weight converters, no folding), for sae_lens's evaluation code.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch


def gpt2_small_folder(folder: Path, seed: int = 0, n_layer: int = 12) -> Path:
    """Save a random GPT-2-small-shaped model into `folder` (once; an existing save is reused)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer)).eval()
    model.save_pretrained(str(folder))
    word_tokenizer(model.config.vocab_size, model.config.eos_token_id).save_pretrained(str(folder))
    return folder


def word_tokenizer(vocab_size: int, eos_id: int) -> Any:
    """A word-level tokenizer over `vocab_size` ids (token i is ``t{i}``; `eos_id` is BOS and EOS), so that a random
    model's every id can be drawn and decoded (GPT-2's own vocabulary needs a download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size) if i != eos_id}
    vocab["<|endoftext|>"] = eos_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1024)


def random_sae_file(path: Path, d: int, d_sae: int, hook_name: str, seed: int = 0) -> Path:
    """A random ReLU SAE ``d -> d_sae`` whose reconstruction is imperfect but sensible, as a plain safetensors file."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d, generator=gen) / d**0.5  # [d_sae d]
    tensors = {"W_enc": (w_dec.T * 2.0).contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)}
    save_file(tensors, str(path), metadata={"hook_name": hook_name})
    return Path(path)


def hooked_transformer(hf_model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """A TransformerLens HookedTransformer holding exactly the weights of the Hugging Face GPT-2 `hf_model`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf_cfg = copy.deepcopy(hf_model.config)
    hf_cfg.architectures = ["GPT2LMHeadModel"]
    hf_cfg.n_ctx = hf_cfg.n_positions  # transformers 5 dropped n_ctx; TransformerLens still reads it
    with tempfile.TemporaryDirectory() as tmp:
        hf_cfg.save_pretrained(tmp)
        cfg_dict = convert_hf_model_config(tmp)
    cfg = HookedTransformerConfig(**{**cfg_dict, "tokenizer_name": None, "device": str(device), "dtype": dtype})
    model = HookedTransformer(cfg)
    state = convert_gpt2_weights(copy.deepcopy(hf_model).to(device=device, dtype=dtype), cfg)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.to(device).to(dtype).eval()
