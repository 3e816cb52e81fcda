"""Causal LMs saved in a local folder with ``save_pretrained`` (config.json, weights, tokenizer files)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel, ModelShape
from klgap_hf.families import shape_of
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


WEIGHTS_HINT = ("a model folder holds the config.json and the weights save_pretrained wrote together (a truncated "
                "or replaced model.safetensors, or a config.json edited since, cannot be measured)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the block (its weight-loading report is a table of many
    lines; a failure is said in one line, and a folder's weights load in seconds)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_loading(path: Path, loading: dict[str, Any]) -> None:
    """Every weight the folder's config.json describes was in its weights file with the shape it says: a tensor
    missing or of another shape would be initialised at random, and a random model measured."""
    missing, mismatched = sorted(loading.get("missing_keys") or []), list(loading.get("mismatched_keys") or [])
    if not missing and not mismatched:
        return
    what = (f"{len(missing)} tensor(s) config.json describes are not in the weights ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''})") if missing else \
        f"{len(mismatched)} tensor(s) have another shape than config.json says ({mismatched[0][0]}: " \
        f"{tuple(mismatched[0][1])} in the weights, {tuple(mismatched[0][2])} by config.json)"
    raise KlgapError(f"model folder {str(path)!r}: config.json disagrees with the weights: {what}; {WEIGHTS_HINT}")


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

    def shape(self) -> ModelShape:
        """Layers, longest context and site widths from the config (klgap.ShapedModelAdapter): no weights read."""
        return shape_of(self.config())

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
        with _quiet_transformers():  # its load report table is not printed: the error below says it in one line
            try:
                hf_model, loading = AutoModelForCausalLM.from_pretrained(
                    str(self.path), config=config, dtype=dtype, local_files_only=True, output_loading_info=True,
                    ignore_mismatched_sizes=True, **extra  # a tensor of another shape: named by check_loading
                )
            except Exception as exc:  # noqa: BLE001 - a damaged file: SafetensorError, RuntimeError, OSError, ...
                raise KlgapError(f"model folder {str(self.path)!r}: cannot load the weights ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); {WEIGHTS_HINT}") from exc
        check_loading(self.path, loading)
        if device_map is not None:
            device = hf_model.get_input_embeddings().weight.device
        return wrap_loaded(self.name, hf_model, tokenizer, device, dtype, (), info, move=device_map is None,
                           tokenizer_note=note or None)
