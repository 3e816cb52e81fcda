"""SAE checkpoints: saved while an SAE trains (``train-sae --checkpoints N``), found again for a study over them.

Training: sae_lens's SAETrainer decides when (``n_checkpoints`` evenly spaced thresholds over the training
samples) and calls :class:`CheckpointSaver` (its ``save_checkpoint_fn``); the saver folds the activation scaling
into a copy of the SAE being trained and saves it as a loadable sae_lens folder
``OUT/checkpoints/step-XXXXXX/`` (cfg.json + sae_weights.safetensors + training.json with the step, the tokens
seen and the held-out explained variance and L0). The last checkpoint is the final SAE itself (copied).

Measuring: ``--sae 'DIR/checkpoints/*'`` (a glob) or a config's ``checkpoints = "DIR"`` key name them;
:func:`expand` lists them in training order.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.sae.heldout import evaluate

#: the folder of an SAE's checkpoints, and the name of one (its training step)
FOLDER = "checkpoints"
STEP_NAME = "step-{step:06d}"
GLOB_CHARS = "*?["


def count(steps: int, checkpoints: int | None, every: int | None) -> int:
    """How many checkpoints to save over `steps` training steps (0: none): ``--checkpoints N`` or one about every
    ``--checkpoint-every STEPS`` steps (the last at the end)."""
    if checkpoints is not None and every is not None:
        raise KlgapError(f"give --checkpoints ({checkpoints}) or --checkpoint-every ({every}), not both")
    for flag, value in (("--checkpoints", checkpoints), ("--checkpoint-every", every)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= steps):
            raise KlgapError(f"{flag} must be an integer from 1 to the training steps ({steps}), got {value!r}")
    if every is not None:
        return math.ceil(steps / every)
    return checkpoints or 0


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's training.json, typed: where in training it was saved and how it reconstructs held-out
    tokens."""

    path: Path
    step: int
    tokens_seen: int
    explained_variance: float
    l0_mean: float
    site: str
    layer: int
    model: str | None = None  # the model it was trained on (training.json's), when it says

    @classmethod
    def read(cls, folder: Path) -> CheckpointInfo:
        try:
            return cls.of(json.loads((folder / "training.json").read_text()), folder)
        except (OSError, ValueError) as exc:
            raise KlgapError(f"{str(folder)!r} is not an SAE checkpoint (no readable training.json: {exc}); train with "
                             "`klgap train-sae --checkpoints N`") from exc

    @classmethod
    def of(cls, data: Any, folder: Path) -> CheckpointInfo:
        """From a checkpoint's training.json as read (or as a run's record keeps it: its SAE's info)."""
        try:
            return cls(path=folder, step=int(data["step"]), tokens_seen=int(data["tokens_seen"]),
                       explained_variance=float(data["explained_variance"]), l0_mean=float(data["l0_mean"]),
                       site=str(data["site"]), layer=int(data["layer"]),
                       model=str(data["model"]) if data.get("model") is not None else None)
        except (ValueError, KeyError, TypeError) as exc:
            raise KlgapError(f"{str(folder)!r} is not an SAE checkpoint (its training.json has no step, tokens_seen, "
                             f"explained_variance and l0_mean: {type(exc).__name__}: {exc}); train with "
                             "`klgap train-sae --checkpoints N`") from exc


class CheckpointSaver:
    """sae_lens's ``save_checkpoint_fn``: each call saves the SAE being trained, as it is now, to a staging folder
    beside the SAE's (moved into it with the final SAE by :meth:`finish`, so a killed run leaves no half SAE)."""

    def __init__(self, out_dir: Path, held_out: Tensor, device: torch.device, facts: dict[str, Any]) -> None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.parent.glob(f".{out_dir.name}.checkpoints-*"):  # a killed run's
            shutil.rmtree(stale, ignore_errors=True)
        self.root = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.checkpoints-"))
        self.held_out, self.device, self.facts = held_out, device, facts
        self.trainer: Any = None  # set by attach(), once sae_lens's trainer exists

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    @torch.no_grad()
    def __call__(self, checkpoint_path: Path | None) -> None:  # sae_lens's SaveCheckpointFn
        from sae_lens import SAE

        trainer = self.trainer
        step = trainer.n_training_samples // trainer.cfg.train_batch_size_samples
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):  # training's RNG untouched
            sae = copy.deepcopy(trainer.sae)
            if trainer.activation_scaler.scaling_factor is not None:  # as SAETrainer.fit folds it at the end
                sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
            folder = self.root / STEP_NAME.format(step=step)
            sae.save_inference_model(folder)
            saved = SAE.load_from_disk(str(folder), device=str(self.device)).eval()
            measured = evaluate(saved, self.held_out, self.device)
        self._write_info(folder, step, trainer.n_training_samples, measured)

    def _write_info(self, folder: Path, step: int, samples: int, measured: dict[str, Any]) -> None:
        info = {**self.facts, "step": step, "tokens_seen": int(samples), **measured}
        (folder / "training.json").write_text(json.dumps(info, indent=2) + "\n")

    def discard(self) -> None:
        """Remove the checkpoints' staging folder if :meth:`finish` did not move it (training stopped early)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def finish(self, staging: Path, result: dict[str, Any]) -> None:
        """Move the checkpoints into the staged SAE folder, the final SAE (already in `staging`) as the last."""
        final = self.root / STEP_NAME.format(step=int(result["steps"]))
        final.mkdir(exist_ok=True)
        for name in os.listdir(staging):
            if (staging / name).is_file() and name != "training.json":
                shutil.copy2(staging / name, final / name)
        self._write_info(final, int(result["steps"]), int(result["n_training_samples"]),
                         {k: result[k] for k in ("explained_variance", "l0_mean", "cos_mean", "mse")})
        os.replace(self.root, staging / FOLDER)


def is_glob(spec: str) -> bool:
    return any(c in spec for c in GLOB_CHARS)


def expand(spec: str) -> list[CheckpointInfo]:
    """The checkpoint folders a glob (``DIR/checkpoints/*``) or an SAE folder with ``checkpoints/`` names, in
    training order; KlgapError when there are none or one is not a checkpoint."""
    path = os.path.expanduser(spec)
    if is_glob(path):
        folders = [Path(p) for p in glob.glob(path) if Path(p).is_dir()]
        where = f"--sae {spec!r} matches no folder"
    else:
        folders = [p for p in (Path(path) / FOLDER).glob("*") if p.is_dir()]
        where = f"{spec!r} has no {FOLDER}/ folder of SAE checkpoints"
    if not folders:
        raise KlgapError(f"{where}; train one with `klgap train-sae ... --checkpoints N`")
    found = sorted((CheckpointInfo.read(folder) for folder in folders), key=lambda c: c.step)
    steps = [c.step for c in found]
    if len(set(steps)) < len(steps):
        raise KlgapError(f"{spec!r} names several checkpoints of the same step ({steps}): give one SAE's checkpoints")
    return found


def verify(spec: str, cells: list[tuple[str, int]], model: str, trains: bool = False) -> list[str]:
    """Every checkpoint a study over `spec` would measure, read and checked before any run folder is bound: its
    training.json and its SAE's hook name say (site, layer), its weights load and are finite (an SAE a run would
    refuse is refused now, naming it); one trained on another model than `model` is a warning. Returns one line
    per (site, layer) for ``--dry-run``. `trains`: a folder a [train_sae] table makes first may be missing."""
    import logging

    from klgap.job.loading import load_sae
    from klgap.plan.grid import sae_for
    from klgap.plan.resolve import route_sae
    from klgap.plan.sites import hook_name
    from klgap.plugins.manager import model_adapter

    trained_on = {model.lower(), model_adapter(model).name.lower()}
    lines = []
    for site, layer in cells:
        filled = sae_for(spec, site, layer) if len(cells) > 1 else spec
        where = hook_name(site, layer)
        if trains and not is_glob(filled) and not Path(filled).expanduser().exists():
            lines.append(f"{site} L{layer}: the checkpoints of {filled}, trained by the [train_sae] table first")
            continue
        found = expand(filled)
        for info in found:
            route = route_sae(str(info.path))
            said = route.hook_name or hook_name(info.site, info.layer)
            if (info.site, info.layer) != (site, layer) or said != where:
                raise KlgapError(f"checkpoint {str(info.path)!r} was trained on {said}, not {where}: a study over "
                                 f"checkpoints measures one SAE's checkpoints at its own site (give those of {where})")
            load_sae(route, torch.device("cpu"))  # readable, an SAE of one site, finite weights
            if info.model is not None and info.model.lower() not in trained_on:
                logging.getLogger("klgap").warning("checkpoint %s was trained on %s, not on %s", info.path,
                                                   info.model, model)
        steps = ", ".join(str(info.step) for info in found)
        lines.append(f"{site} L{layer}: {len(found)} checkpoint(s) of {filled} (steps {steps}): hook name, weights "
                     "read and finite")
    return lines
