"""SAEs on disk: a sae_lens folder (cfg.json + sae_weights.safetensors) and a plain safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedSAE
from klgap_saes.common import wrap_sae_lens

REQUIRED = ("W_enc", "W_dec", "b_enc", "b_dec")


class SaeLensDiskLoader:
    """A folder written by sae_lens's save_inference_model (what `klgap train-sae` writes)."""

    description = "a sae_lens folder: cfg.json + sae_weights.safetensors (e.g. from klgap train-sae)"

    def can_load(self, spec: str) -> bool:
        path = Path(spec).expanduser()
        if not (path.is_dir() and (path / "cfg.json").is_file()):
            return False
        # cfg.json + sae.safetensors (and no sae_weights.safetensors) is an EleutherAI sparsify folder
        return (path / "sae_weights.safetensors").is_file() or not (path / "sae.safetensors").is_file()

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        from sae_lens import SAE

        path = Path(spec).expanduser()
        if not path.is_dir():
            raise KlgapError(f"SAE folder {spec!r} does not exist")
        for name in ("cfg.json", "sae_weights.safetensors"):
            if not (path / name).is_file():
                raise KlgapError(f"SAE folder {spec!r} has no {name}; a sae_lens folder holds cfg.json + sae_weights.safetensors")
        try:
            json.loads((path / "cfg.json").read_text())
            sae = SAE.load_from_disk(str(path), device=str(device))
        except ValueError as exc:
            raise KlgapError(f"SAE folder {spec!r} could not be read: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - safetensors / torch errors on a damaged file
            raise KlgapError(f"SAE folder {spec!r} could not be read (corrupt or truncated?): {type(exc).__name__}: {exc}") from exc
        info = {}
        training = path / "training.json"
        if training.is_file():
            info["training"] = json.loads(training.read_text())
        return wrap_sae_lens(sae, str(path), device, info)


class SafetensorsLoader:
    """A plain .safetensors file: W_enc [d_in d_sae], W_dec [d_sae d_in], b_enc, b_dec (+ threshold -> JumpReLU)."""

    description = "a .safetensors file of W_enc, W_dec, b_enc, b_dec (+ threshold for JumpReLU); hook_name in its metadata"

    def can_load(self, spec: str) -> bool:
        return spec.endswith(".safetensors") and Path(spec).expanduser().is_file()

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        from safetensors import safe_open

        path = Path(spec).expanduser()
        if not path.is_file():
            raise KlgapError(f"SAE file {spec!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:  # noqa: BLE001
            raise KlgapError(f"SAE file {spec!r} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
        missing = [k for k in REQUIRED if k not in tensors]
        if missing:
            raise KlgapError(f"SAE file {spec!r} lacks {', '.join(missing)}; it needs {', '.join(REQUIRED)} (+ threshold)")
        d_in, d_sae = tensors["W_enc"].shape if tensors["W_enc"].dim() == 2 else (None, None)
        expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        if "threshold" in tensors:
            expected["threshold"] = (d_sae,)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise KlgapError(
                    f"SAE file {spec!r}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                    f"(from W_enc [d_in={d_in}, d_sae={d_sae}])"
                )
        return wrap_sae_lens(build_sae(tensors, metadata), str(path), device, {"format": "safetensors"})


def build_sae(tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """A sae_lens StandardSAE (or JumpReLUSAE when a threshold is given) holding these weights."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig

    d_in, d_sae = tensors["W_enc"].shape
    meta = {k: metadata[k] for k in ("hook_name", "model_name") if k in metadata}
    jump = "threshold" in tensors
    cfg_cls, sae_cls = (JumpReLUSAEConfig, JumpReLUSAE) if jump else (StandardSAEConfig, StandardSAE)
    cfg = cfg_cls(d_in=int(d_in), d_sae=int(d_sae), dtype="float32", device="cpu")
    for key, value in meta.items():
        cfg.metadata[key] = value
    sae = sae_cls(cfg)
    state = {k: v.float() for k, v in tensors.items() if k in (*REQUIRED, "threshold")}
    sae.load_state_dict(state, strict=True)
    return sae


def save_safetensors_sae(path, W_enc, W_dec, b_enc, b_dec, threshold=None, hook_name=None, model_name=None) -> Path:
    """Write the plain format this loader reads (used by tests and by users converting their SAEs)."""
    from safetensors.torch import save_file

    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold
    metadata = {k: v for k, v in (("hook_name", hook_name), ("model_name", model_name)) if v}
    save_file({k: v.detach().contiguous().float().cpu() for k, v in tensors.items()}, str(path), metadata=metadata or None)
    return Path(path)
