"""From an SAE checkpoint on disk to a sae_lens SAE: the one path every file format shares.

As SAELens does with its format converters, each format (the plain safetensors file, EleutherAI sparsify,
dictionary_learning) is a thin converter that turns its files into a :class:`Converted`: ``cfg_dict``, a
sae_lens config as a dict (``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``, ``k`` for TopK,
``metadata: {hook_name, model_name}``), ``state_dict`` under sae_lens's parameter names (``W_enc [d_in d_sae]``,
``W_dec [d_sae d_in]``, ``b_enc``, ``b_dec``, ``threshold``, ...) and ``info`` (provenance for the report).
This module holds what they share:

- :class:`FolderFormat`: which files a format's folder holds, and its errors: a missing folder, a missing file
  (naming the inner folders when the user passed their parent), an unreadable JSON file;
- :func:`read_safetensors`, :func:`read_safetensors_metadata`, :func:`read_torch`: readers whose errors say
  "corrupt or truncated?";
- :func:`require_keys`, :func:`check_shapes`: tensors missing or of the wrong shape, in one wording;
- :func:`build_sae`: the sae_lens SAE of ``cfg_dict["architecture"]``, looked up in sae_lens's registry
  (where :func:`register_architecture` adds one of klgap's, e.g. sparsify's ``groupmax``), holding
  ``state_dict``; :func:`load_converted`: that SAE as a klgap LoadedSAE on the device.

Nothing here imports sae_lens or safetensors at module level: the CLI imports every plugin to build its parser.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klgap.errors import KlgapError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from klgap.protocols import LoadedSAE


@dataclass(frozen=True)
class Converted:
    """What a format's converter makes of its files (see the module docstring)."""

    cfg_dict: dict[str, Any]
    state_dict: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderFormat:
    """A format stored as a folder of fixed files, e.g. sparsify's ``cfg.json`` + ``sae.safetensors``.

    name:    the format, as errors name it (``sparsify``).
    files:   the files the folder holds; a subfolder holding ``files[0]`` is one of this format's folders.
    unit:    what one such folder is called (``hookpoint folder``).
    example: a path to show (``CHECKPOINT/layers.6``).
    """

    name: str
    files: tuple[str, ...]
    unit: str
    example: str

    def where(self, spec: str) -> str:
        return f"{self.name} folder {spec!r}"

    def matches(self, spec: str) -> bool:
        """True if `spec` is a folder holding every one of the format's files (a loader's ``can_load``)."""
        path = Path(spec).expanduser()
        return path.is_dir() and all((path / name).is_file() for name in self.files)

    def folder(self, spec: str) -> Path:
        """The folder `spec` names, or an error saying which file is missing (and which inner folders to pass)."""
        path = Path(spec).expanduser()
        holds = " + ".join(self.files)
        if not path.is_dir():
            raise KlgapError(f"{self.where(spec)} does not exist; pass a {self.unit} holding {holds} (e.g. {self.example})")
        for name in self.files:
            if not (path / name).is_file():
                inner = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / self.files[0]).is_file())
                hint = f"; it holds {self.unit}s {', '.join(inner)}: pass one of them" if inner else ""
                raise KlgapError(f"{self.where(spec)} has no {name}; a {self.unit} holds {holds}{hint}")
        return path

    def read_json(self, file: Path, spec: str, expected: str) -> dict[str, Any]:
        """A JSON object from `file`; `expected` says what it should hold when it is not an object."""
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KlgapError(f"{self.where(spec)}: {file.name} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise KlgapError(f"{self.where(spec)}: {file.name} holds a {type(data).__name__}, expected {expected}")
        return data


def read_safetensors(file: Path, where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors on CPU, string metadata) of a safetensors file; `where` names it in the error."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on a damaged file
        raise KlgapError(f"{where} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc


def read_safetensors_metadata(file: Path, where: str) -> dict[str, str]:
    """The string metadata of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise KlgapError(f"{where} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc


def read_torch(file: Path, where: str) -> Any:
    """What ``torch.save`` wrote to `file` (tensors only: ``weights_only=True``), on CPU."""
    import torch

    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise KlgapError(f"{where} is not a readable torch file (corrupt or truncated?): {type(exc).__name__}: {first}") from exc


def require_keys(tensors: dict[str, Tensor], keys: tuple[str, ...] | list[str], where: str, needs: str) -> None:
    """`where` (a file) lacks some of `keys`: one error naming them; `needs` says what a good file holds."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise KlgapError(f"{where} lacks {', '.join(missing)}; {needs}")


def check_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str, because: str) -> None:
    """Each named tensor has its expected shape (``()`` accepts any one-element tensor); `because` says where
    the expected sizes came from."""
    for name, shape in expected.items():
        actual = tuple(tensors[name].shape)
        if actual != shape and not (shape == () and tensors[name].numel() == 1):
            raise KlgapError(f"{where}: {name} has shape {actual}, expected {shape} ({because})")


_ARCHITECTURES: dict[str, Any] = {}  # architecture -> zero-argument function returning (SAE class, config class)


def register_architecture(name: str, classes: Any) -> None:
    """Make `name` buildable: `classes()` returns ``(sae_class, config_class)`` (sae_lens subclasses whose
    config's ``architecture()`` is `name`); they are added to sae_lens's registry on first use."""
    _ARCHITECTURES[name] = classes


@lru_cache(maxsize=None)
def _registered(architecture: str) -> tuple[type, type]:
    import sae_lens
    from sae_lens.registry import get_sae_class

    if architecture in _ARCHITECTURES:
        try:
            return get_sae_class(architecture)
        except KeyError:
            sae_class, config_class = _ARCHITECTURES[architecture]()
            sae_lens.register_sae_class(architecture, sae_class, config_class)
    return get_sae_class(architecture)


def check_known_architecture(architecture: Any, where: str) -> None:
    """An SAE architecture sae_lens (or a klgap plugin, :func:`register_architecture`) can build; else one line
    naming it and the valid ones."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    known = sorted({*SAE_CLASS_REGISTRY, *_ARCHITECTURES})
    if architecture not in known:
        from klgap.errors import unknown

        raise KlgapError(f"{where}: {unknown('SAE architecture', str(architecture), known)}") from None


def build_sae(cfg_dict: dict[str, Any], state_dict: dict[str, Tensor]) -> Any:
    """The sae_lens SAE of ``cfg_dict["architecture"]`` (float32, CPU) holding `state_dict` (strict)."""
    architecture = cfg_dict["architecture"]
    check_known_architecture(architecture, "the SAE's config")
    sae_class, config_class = _registered(architecture)
    cfg = config_class.from_dict({**cfg_dict, "dtype": "float32", "device": "cpu"})
    sae = sae_class(cfg)
    sae.load_state_dict({k: v.float().contiguous() for k, v in state_dict.items()}, strict=True)
    return sae


def load_converted(converted: Converted, source: str, device: torch.device, center_resid: bool = False) -> LoadedSAE:
    """A converter's output as a klgap LoadedSAE on `device` (see :func:`klgap_saes.common.wrap_sae_lens`)."""
    from klgap_saes.common import wrap_sae_lens

    sae = build_sae(converted.cfg_dict, converted.state_dict)
    return wrap_sae_lens(sae, source, device, converted.info, center_resid=center_resid)


__all__ = [
    "Converted", "FolderFormat", "build_sae", "check_known_architecture", "check_shapes", "load_converted", "read_safetensors",
    "read_safetensors_metadata", "read_torch", "register_architecture", "require_keys",
]
