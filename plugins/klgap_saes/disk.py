"""SAEs on disk: a sae_lens folder (cfg.json + sae_weights.safetensors) and a plain safetensors file.

The plain file's format (tensor names, writer) lives in :mod:`klgap.sae.file`; its converter is
:func:`convert_safetensors`, built into a sae_lens SAE by :mod:`klgap_saes.convert`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from klgap.errors import KlgapError
from klgap.protocols import LoadedSAE, SAECheck
from klgap.sae.file import HOOK_OUT, METADATA, REQUIRED, SKIP, THRESHOLD, save_safetensors_sae
from klgap.sae.transcoder import written_hook
from klgap_saes.common import trained_centred, wrap_sae_lens
from klgap_saes.convert import Converted, check_known_architecture, check_shapes, load_converted, read_safetensors, read_safetensors_metadata, require_keys

if TYPE_CHECKING:
    import torch
    from torch import Tensor

SAE_LENS_FILES = ("cfg.json", "sae_weights.safetensors")
CFG_REQUIRED = ("d_in", "d_sae")  # what every sae_lens architecture's config needs (positive integers)


def _malformed(spec: str, fields: list[str]) -> str:
    """A cfg.json missing what sae_lens needs: which fields, and what writes a valid folder."""
    return (f"SAE folder {spec!r}: cfg.json lacks {', '.join(fields)} (or {'they are' if len(fields) > 1 else 'it is'} "
            "not a positive integer); a sae_lens cfg.json holds architecture, d_in, d_sae and metadata.hook_name, "
            "as `klgap train-sae` or sae_lens's SAE.save_model writes it")


class SaeLensDiskLoader:
    """A folder written by sae_lens's save_inference_model (what `klgap train-sae` writes)."""

    description = "a sae_lens folder: cfg.json + sae_weights.safetensors (e.g. from klgap train-sae)"

    def can_load(self, spec: str) -> bool:
        path = Path(spec).expanduser()
        if not (path.is_dir() and (path / "cfg.json").is_file()):
            return False
        # cfg.json + sae.safetensors (and no sae_weights.safetensors) is an EleutherAI sparsify folder
        return (path / "sae_weights.safetensors").is_file() or not (path / "sae.safetensors").is_file()

    def _folder(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise KlgapError(f"SAE folder {spec!r} does not exist")
        for name in SAE_LENS_FILES:
            if not (path / name).is_file():
                raise KlgapError(f"SAE folder {spec!r} has no {name}; a sae_lens folder holds cfg.json + sae_weights.safetensors")
        return path

    def check(self, spec: str) -> SAECheck:
        """The hook name and model in cfg.json (``metadata`` in sae_lens 6, top level before); no weights read."""
        path = self._folder(spec)
        try:
            cfg = json.loads((path / "cfg.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KlgapError(f"SAE folder {spec!r}: cfg.json is not valid JSON: {exc}") from exc
        if not isinstance(cfg, dict):
            raise KlgapError(f"SAE folder {spec!r}: cfg.json holds a {type(cfg).__name__}, expected a sae_lens config object")
        missing = [key for key in CFG_REQUIRED if not isinstance(cfg.get(key), int) or cfg[key] < 1]
        if missing:
            raise KlgapError(_malformed(spec, missing))
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg
        architecture = str(cfg.get("architecture", "standard"))
        hook = meta.get("hook_name")
        if "transcoder" in architecture:  # the run's site is the one it writes (klgap.sae.transcoder)
            out = meta.get(HOOK_OUT) or cfg.get(HOOK_OUT)
            hook = written_hook(hook, out, f"SAE folder {spec!r} (a {architecture})")
        return SAECheck(hook_name=hook, model=meta.get("model_name"),
                        detail=f"sae_lens folder ({architecture}, d_sae {cfg.get('d_sae')})")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        from sae_lens import SAE

        path = self._folder(spec)
        self.check(spec)  # cfg.json readable, with d_in and d_sae (its errors name what is missing)
        architecture = json.loads((path / "cfg.json").read_text()).get("architecture", "standard")
        check_known_architecture(architecture, f"SAE folder {spec!r}: cfg.json")
        try:
            sae = SAE.load_from_disk(str(path), device=str(device))
        except ValueError as exc:
            raise KlgapError(f"SAE folder {spec!r} could not be read: {exc}") from exc
        except TypeError as exc:  # sae_lens's config class refused cfg.json: a field it needs is missing
            fields = re.findall(r"'(\w+)'", str(exc)) if "required" in str(exc) else []
            if not fields:
                raise KlgapError(f"SAE folder {spec!r}: cfg.json is not a sae_lens config: {exc}") from exc
            raise KlgapError(_malformed(spec, fields)) from exc
        except Exception as exc:  # noqa: BLE001 - safetensors / torch errors on a damaged file
            raise KlgapError(f"SAE folder {spec!r} could not be read (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
        info = {}
        training = path / "training.json"
        if training.is_file():
            info["training"] = json.loads(training.read_text())
        return wrap_sae_lens(sae, str(path), device, info, center_resid=trained_centred(sae))


class SafetensorsLoader:
    """A plain .safetensors file: W_enc [d_in d_sae], W_dec [d_sae d_in], b_enc, b_dec (+ threshold -> JumpReLU)."""

    description = "a .safetensors file of W_enc, W_dec, b_enc, b_dec (+ threshold for JumpReLU); hook_name in its metadata"

    def can_load(self, spec: str) -> bool:
        return spec.endswith(".safetensors") and Path(spec).expanduser().is_file()

    def _file(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise KlgapError(f"SAE file {spec!r} does not exist")
        return path

    def check(self, spec: str) -> SAECheck:
        """The hook and model names in the file's metadata (its header only)."""
        metadata = read_safetensors_metadata(self._file(spec), f"SAE file {spec!r}")
        hook = metadata.get("hook_name")
        if metadata.get(HOOK_OUT):  # a transcoder: its run's site is what it writes
            return SAECheck(hook_name=written_hook(hook, metadata.get(HOOK_OUT), f"SAE file {spec!r}"),
                            model=metadata.get("model_name"), detail="plain safetensors transcoder")
        return SAECheck(hook_name=hook, model=metadata.get("model_name"), detail="plain safetensors SAE")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        path = self._file(spec)
        tensors, metadata = read_safetensors(path, f"SAE file {spec!r}")
        return load_converted(convert_safetensors(tensors, metadata, spec), str(path), device)


def convert_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str], spec: str) -> Converted:
    """A sae_lens StandardSAE (JumpReLUSAE when a threshold is given) holding the plain file's tensors; a
    transcoder (its metadata names ``hook_name_out``; ``W_skip`` for a skip transcoder, W_dec may be [d_sae d_out]) as
    sae_lens's Transcoder / SkipTranscoder / JumpReLUTranscoder / JumpReLUSkipTranscoder."""
    where = f"SAE file {spec!r}"
    require_keys(tensors, REQUIRED, where, f"it needs {', '.join(REQUIRED)} (+ {THRESHOLD}, + {SKIP} for a skip "
                 "transcoder)")
    d_in, d_sae = tensors["W_enc"].shape if tensors["W_enc"].dim() == 2 else (None, None)
    transcoder = HOOK_OUT in metadata  # a plain transcoder file names the hook it writes
    d_out = tensors["W_dec"].shape[-1] if transcoder and tensors["W_dec"].dim() == 2 else d_in
    if SKIP in tensors and not transcoder:
        raise KlgapError(f"{where} holds {SKIP} (a skip transcoder's) but its metadata names no "
                         f"{HOOK_OUT}; a plain transcoder file names the hook it reads (hook_name: "
                         f"blocks.L.ln2.hook_normalized) and the one it writes ({HOOK_OUT}: blocks.L.hook_mlp_out)")
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    if THRESHOLD in tensors:
        expected[THRESHOLD] = (d_sae,)
    if SKIP in tensors:
        expected[SKIP] = (d_out, d_in)
    check_shapes(tensors, expected, where, f"from W_enc [d_in={d_in}, d_sae={d_sae}] and W_dec [d_sae, d_out={d_out}]")
    unread = sorted(set(tensors) - set(expected))
    if unread:
        raise KlgapError(f"{where} holds tensors a plain SAE file does not: {', '.join(unread)}; it holds "
                         f"{', '.join(REQUIRED)} (+ {THRESHOLD}, + {SKIP}) only")
    architecture = "jumprelu" if THRESHOLD in tensors else "standard"
    meta = {k: metadata[k] for k in METADATA if k in metadata}
    cfg_dict: dict = {"d_in": int(d_in), "d_sae": int(d_sae), "metadata": meta}
    if transcoder:
        skip = "skip_" if SKIP in tensors else ""
        architecture = f"jumprelu_{skip}transcoder" if THRESHOLD in tensors else f"{skip}transcoder"
        cfg_dict |= {"d_out": int(d_out), "apply_b_dec_to_input": False}
        if HOOK_OUT in metadata:
            meta[HOOK_OUT] = metadata[HOOK_OUT]
    return Converted({"architecture": architecture, **cfg_dict}, {k: tensors[k] for k in expected},
                     {"format": "safetensors"})


__all__ = ["SaeLensDiskLoader", "SafetensorsLoader", "convert_safetensors", "save_safetensors_sae"]
