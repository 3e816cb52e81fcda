"""Causal LMs saved in a local folder with ``save_pretrained`` (config.json, weights, tokenizer files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel
from klgap_hf.loaded import check_structure, wrap_loaded


def check_folder(path: Path) -> Path:
    """`path` resolved, if it is a folder holding config.json; KlgapError naming what is missing otherwise."""
    if not path.is_dir():
        raise KlgapError(f"model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise KlgapError(
            f"model folder {str(path)!r} has no config.json (it holds: {present}); a model folder is what "
            "save_pretrained writes: config.json, the weights (model.safetensors) and the tokenizer files"
        )
    return path.resolve()


@dataclass
class FolderAdapter:
    """A causal LM in a local folder, loaded with ``AutoModelForCausalLM.from_pretrained(folder)``."""

    path: Path
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self.path = check_folder(Path(self.path).expanduser())
        self.name = self.name or self.path.name
        self.description = self.description or f"the causal LM saved in {self.path}"

    def config(self) -> Any:
        """The folder's transformers config (nothing else is read)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise KlgapError(f"model folder {str(self.path)!r}: cannot read config.json ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from exc

    def tokenizer(self) -> tuple[Any | None, str]:
        """The folder's tokenizer and what a reader should know about it (klgap_hf.tokenizer.folder_tokenizer:
        None when the folder holds no tokenizer files or they make an empty tokenizer)."""
        from klgap_hf.tokenizer import folder_tokenizer

        return folder_tokenizer(self.path)

    def load(self, device: torch.device, dtype: torch.dtype, device_map: str | None = None) -> LoadedModel:
        """Config first (a model whose blocks cannot be found fails before the weights are read), then the
        tokenizer (tokenizer.json as written when transformers' pick for the model type splits text differently;
        none when the folder has no tokenizer files or they make an empty tokenizer), then the weights."""
        from transformers import AutoModelForCausalLM

        config = self.config()
        check_structure(config)
        info: dict[str, Any] = {"source": f"folder:{self.path}"}
        tokenizer, note = self.tokenizer()
        if note:
            info["tokenizer_note"] = note
        extra = {"device_map": device_map} if device_map is not None else {}
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(self.path), config=config, dtype=dtype, local_files_only=True, **extra
            )
        except (OSError, ValueError) as exc:
            raise KlgapError(f"model folder {str(self.path)!r}: cannot load the weights ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from exc
        if device_map is not None:
            device = hf_model.get_input_embeddings().weight.device
        return wrap_loaded(self.name, hf_model, tokenizer, device, dtype, (), info, move=device_map is None,
                           tokenizer_note=note or None)
