"""The run configuration: every knob of a measurement, validated before any heavy work."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError, unknown
from klgap.plan.sites import SITES

log = logging.getLogger("klgap")

MODES = ("all_tokens", "single_token", "many_samples")
DEFAULT_INTERVENTIONS = (
    "sae",
    "sae_norm_corrected",
    "sae_norm",
    "epsilon_random",
    "theta_random",
    "theta_random_xnorm",
)
#: --mask-special: which tokens are left unpatched and unmeasured (klgap/job/masks.py)
MASK_SPECIAL = ("none", "first", "all")
#: --joint-baseline: where a joint run's baselines take each site's SAE error from (klgap/job/patch.py)
JOINT_BASELINES = ("matched", "clean", "reencoded")
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")  # float64: reference runs; auto: klgap/plan/dtypes.py
#: keys of a replication file that are not RunConfig fields: the command's (out, train_sae, sae_checkpoints, ...)
#: and those a command reads (cos, norm_frac: klgap curve's grid)
FILE_KEYS = ("out", "overwrite", "meta", "description", "train_sae", "cos", "norm_frac", "sae_checkpoints", "along",
             "scale", "baselines")
#: replication-file keys since renamed: old -> new (``checkpoints`` also named train-sae's --checkpoints N)
LEGACY_FILE_KEYS = {"checkpoints": "sae_checkpoints"}


def flag(help: str, default: str | None = None, text: bool = False) -> dict[str, Any]:
    """A RunConfig field's metadata: the one place its command-line flag (``--name-with-dashes``) is described.
    help: what the flag does; default: how the help states a default the field's own cannot say (``from the
    SAE``); text: an int field whose flag takes text too (``--layer 3,10,17``)."""
    return {"help": help, "default": default, "text": text}


@dataclass
class RunConfig:
    """One measurement: a model, a site and layer, an SAE, interventions and a mode.

    Every field is named as its command-line flag (``--tokens`` -> ``tokens``, ``--no-bos`` -> ``no_bos``), in
    a config file and in Python alike; each field's metadata (:func:`flag`) holds its help, from which
    klgap/cli/args.py builds the flag (:func:`flag_help` adds the default). site/layer may be None: the SAE's own
    hook name then selects them. contexts = ceil(tokens / context_len). `joint` patches every (site, layer) of
    `site` x `layer` in the same forward, each with its own SAE (klgap/job/plan.py); `layer` then holds the list.
    """

    model: str = field(metadata=flag("model name (see `klgap plugins`), e.g. smollm2-135m, gpt2, tiny-gpt2; a hub "
                                     "repo id (ORG/NAME) or a folder saved with save_pretrained"))
    site: str | None = field(default=None, metadata=flag(
        "resid_pre, resid_post, attn_out, mlp_in, mlp_out or attn_z, or a comma list", default="from the SAE"))
    layer: int | None = field(default=None, metadata=flag(
        "layer index, a list (3,10,17), a range (0-5) or all; several sites/layers make one study report, with "
        "{layer}/{site} in --sae", default="from the SAE", text=True))
    sae: str | None = field(default=None, metadata=flag(
        "sae_lens:RELEASE/SAE_ID, a saved sae_lens folder, or a .safetensors file ({site}/{layer} filled in); a glob "
        "('DIR/checkpoints/*') measures every SAE checkpoint it matches in one study (over training)",
        default="the model's pretrained SAE for the site, when one is known"))
    mode: str = field(default="all_tokens", metadata=flag("all_tokens, single_token or many_samples"))
    interventions: list[str] = field(default_factory=lambda: list(DEFAULT_INTERVENTIONS), metadata=flag(
        "comma-separated, e.g. sae,epsilon_random,cosine_matched:cos=0.8,norm_frac=0.9"))
    tokens: int = field(default=8192, metadata=flag("tokens to read"))
    context_len: int = field(default=128, metadata=flag("tokens per context"))
    batch_size: int = field(default=8, metadata=flag("contexts per batch"))
    seed: int = field(default=0, metadata=flag("random seed (token sampling and every random draw)"))
    device: str = field(default="auto", metadata=flag("auto (CUDA when there is one), cpu, cuda, cuda:N"))
    dtype: str = field(default="float32", metadata=flag(
        "what the model computes in: float32; bfloat16 or float16 (the patch and KL stay float32; checked against "
        "float32 on the first contexts, said in the report); auto (bfloat16 where the device has it and the check "
        "passes, else float32); float64 for reference runs"))
    dataset: str = field(default="sample", metadata=flag(
        "token source NAME[:ARG]: sample, text:PATH, hf:NAME[:SPLIT], random (klgap plugins lists them); a source "
        "with splits is read at its eval split when none is named (sample -> sample:eval; train-sae reads "
        "sample:train)"))
    no_bos: bool = field(default=False, metadata=flag("do not prepend BOS to each context"))
    mask_special: str = field(default="all", metadata=flag(
        "tokens left unpatched (the SAE never sees them) and unmeasured: all (position 0 and every special token "
        "of the tokenizer: BOS, EOS, PAD, SEP, as sae_lens's evals exclude them, e.g. the separators of packed "
        "documents); first (position 0 only, the BOS / attention sink); none (every token patched and measured). "
        "zero ablation replaces every position whatever this says (sae_lens's get_recons_loss)"))
    drop_last_position: bool = field(default=False, metadata=flag(
        "patch the last position of each context but do not measure it (its KL has no ΔCE beside it; the study's "
        "error_eval.py); measured by default"))
    position: int = field(default=32, metadata=flag("single-token / many-samples: the patched position t"))
    k: int = field(default=16, metadata=flag("single-token: measure positions t..t+k"))
    n_samples: int = field(default=500, metadata=flag("many-samples: draws of --sample-intervention per context"))
    sample_intervention: str = field(default="epsilon_random", metadata=flag(
        "many-samples: the random perturbation drawn"))
    no_fast: bool = field(default=False, metadata=flag(
        "all-token mode: run every intervention as a full forward through nnsight instead of rerunning only the "
        "layers above the site"))
    device_map: str | None = field(default=None, metadata=flag(
        "hub models: spread the layers over devices, e.g. auto (transformers/accelerate)", default="one device"))
    remote: bool = field(default=False, metadata=flag(
        "hub models: run every forward pass on NDIF through nnsight (needs an NDIF API key); nothing is downloaded"))
    joint: bool = field(default=False, metadata=flag(
        "patch every --site/--layer listed in the same forward, each with its own SAE ({site}/{layer} in --sae), "
        "and measure each alone on the same tokens: the report's compounding section compares them"))
    fit_tokens: int | None = field(default=None, metadata=flag(
        "fit the fitted interventions (epsilon_anisotropic, sae_plus_linear_error, ...) on this many tokens drawn "
        "from the token source after the measured ones (disjoint from them)",
        default="the run's first contexts, up to 8192 tokens: the measured ones"))
    second_order: bool = field(default=False, metadata=flag(
        "all_tokens / single_token: also predict each token's KL to second order, ½ (Jδ)ᵀ(diag p − ppᵀ)(Jδ) for each "
        "intervention's δ = x' − x (forward-mode JVPs through the layers above the site; column kl_second_order), "
        "and measure the site's Fisher sensitivity (tr F, covariance-shaped, the SAE error's Rayleigh quotient, its "
        "share in F's top eigendirections): the report's second_order section; costs ~100 extra passes "
        "through the layers above the site a batch (JVPs, VJPs, Lanczos)"))
    joint_subsets: bool = field(default=False, metadata=flag(
        "with --joint (3 or more sites): also patch every subset of two or more sites together in the same pass "
        "(OUT/subsets/<name>/), sharing each batch's clean forward and single-site runs"))
    joint_baseline: str = field(default="matched", metadata=flag(
        "with --joint: the SAE error each site's baselines (epsilon_random, theta_random, ...) are sized by: matched "
        "(the error of the joint SAE run at that site, so baseline and SAE patch sizes agree token by token), "
        "clean (the SAE's error on the clean activation, as the site alone) or reencoded (the SAE re-encoding the "
        "activation the baseline's own patched forward gives the site)"))

    @property
    def n_contexts(self) -> int:
        return max(1, math.ceil(self.tokens / self.context_len))

    # the engine's words for the flags: derived, never stored
    @property
    def n_tokens(self) -> int:
        return self.tokens

    @property
    def skip_first_position(self) -> bool:
        """Position 0 is neither patched nor measured (--mask-special first or all)."""
        return self.mask_special != "none"

    @property
    def prepend_bos(self) -> bool:
        return not self.no_bos

    @property
    def fast(self) -> bool:
        return not self.no_fast

    def validate(self) -> "RunConfig":
        """Check what can be checked without loading anything; raise KlgapError on the first problem."""
        if self.mode not in MODES:
            raise unknown("mode", self.mode, MODES)
        if self.site is not None and not self.joint and self.site not in SITES:
            raise unknown("site", self.site, SITES)
        if self.mask_special not in MASK_SPECIAL:
            raise unknown("mask-special", self.mask_special, MASK_SPECIAL)
        if self.dtype not in DTYPES:
            raise unknown("dtype", self.dtype, DTYPES)
        for name, value, low in (
            ("--tokens", self.tokens, 1),
            ("--context-len", self.context_len, 2),
            ("--batch-size", self.batch_size, 1),
            ("--n-samples", self.n_samples, 2),
        ):
            if not isinstance(value, int) or value < low:
                raise KlgapError(f"{name} must be an integer ≥ {low}, got {value!r}")
        if self.fit_tokens is not None and (not isinstance(self.fit_tokens, int) or self.fit_tokens < 2):
            raise KlgapError(f"--fit-tokens must be an integer ≥ 2 (tokens to fit on, apart from the measured ones), "
                             f"got {self.fit_tokens!r}")
        if self.joint_baseline not in JOINT_BASELINES:
            raise unknown("joint-baseline", self.joint_baseline, JOINT_BASELINES)
        if self.joint:
            cells = self.joint_cells()
            if self.joint_subsets and len(cells) < 3:
                raise KlgapError(f"--joint-subsets needs at least 3 sites/layers (got {len(cells)}: {cells}); "
                                 "with 2 the joint run itself is the only subset of two")
        elif self.joint_subsets:
            raise KlgapError("--joint-subsets is an option of joint runs; add --joint")
        elif isinstance(self.layer, str) and self.layer.isdigit():
            self.layer = int(self.layer)
        if not self.joint and self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise KlgapError(f"--layer must be a non-negative integer, got {self.layer!r}")
        if self.position < 0 or self.k < 0:
            raise KlgapError(f"--position and --k must be ≥ 0, got position={self.position}, k={self.k}")
        first = 1 if self.skip_first_position else 0
        if self.mode != "all_tokens":
            if self.position < first:
                raise KlgapError(
                    f"--position {self.position} is the skipped first position; use a position ≥ {first} "
                    "or --mask-special none"
                )
            last = self.position + (self.k if self.mode == "single_token" else 0)
            dropped = 1 if self.drop_last_position else 0
            if last >= self.context_len - dropped:
                raise KlgapError(
                    f"--context-len {self.context_len} is too short for {self.mode} at position "
                    f"{self.position} with k={self.k if self.mode == 'single_token' else 0}"
                    f"{' and --drop-last-position' if dropped else ''}: it needs context_len ≥ {last + 1 + dropped}"
                )
        if not self.interventions:
            raise KlgapError("--interventions is empty; give at least one, e.g. sae,epsilon_random")
        if self.second_order and (self.mode == "many_samples" or self.joint or self.remote):
            why = "--joint" if self.joint else "--remote" if self.remote else "--mode many_samples"
            raise KlgapError(f"--second-order is not supported with {why}: it predicts a single site's KL in "
                             "all_tokens or single_token mode on a local model")
        return self

    def joint_cells(self) -> list[tuple[str, int]]:
        """A joint run's (site, layer) pairs, in the order given (`site` and `layer` may be comma lists)."""
        from klgap.plan.grid import parse_layers, parse_sites

        if self.site is None or self.layer is None:
            raise KlgapError("--joint needs --site and --layer (e.g. --site resid_post --layer 3,10,17)")
        if self.remote:
            raise KlgapError("--joint patches every site in one local forward; --remote is not supported with it")
        layers = parse_layers(self.layer)
        if layers == "all":
            raise KlgapError("--joint needs the layers listed (e.g. 3,10,17 or 0-5), not all")
        self.layer = layers
        return [(site, layer) for site in parse_sites(self.site) for layer in layers]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """A config from flag-named keys (``-`` or ``_``); the pre-0.2 keys (``n_tokens``, ``prepend_bos``,
        ``skip_first_position``, ``fast``) and ``include_first_position`` (now ``mask_special``) still work, with a
        deprecation note naming the new key."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            key = key.replace("-", "_")
            if key in LEGACY_KEYS:
                new, convert = LEGACY_KEYS[key]
                if any(other.replace("-", "_") == new for other in data):
                    raise KlgapError(f"config key {key!r} is the old name of {new!r}, and both are given; keep {new}")
                warnings.warn(f"config key {key!r} is deprecated: write {new} = {convert(value)!r}",
                              DeprecationWarning, stacklevel=2)
                log.warning("config key %r is deprecated: write %s = %r", key, new, convert(value))
                key, value = new, convert(value)
            if key not in names:
                raise unknown("config key", key, names)
            values[key] = value
        return cls(**values)


def flag_help(item: dataclasses.Field) -> str:
    """A RunConfig field's flag help with its default: the field's own (``(default 8192)``), or its metadata's words
    for a default the value cannot say; a switch (bool) says nothing more."""
    meta = item.metadata
    if item.type == "bool":
        return meta["help"]
    value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
    if value is dataclasses.MISSING:
        return meta["help"]
    said = meta["default"] or (", ".join(value) if isinstance(value, list) else value)  # spaces: help wraps there
    return f"{meta['help']} (default {said})"


#: pre-0.2 config keys -> (the flag-named field, how its value converts)
LEGACY_KEYS = {
    "n_tokens": ("tokens", lambda v: v),
    "prepend_bos": ("no_bos", lambda v: not v),
    "skip_first_position": ("mask_special", lambda v: "first" if v else "none"),
    "include_first_position": ("mask_special", lambda v: "none" if v else "first"),
    "fast": ("no_fast", lambda v: not v),
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a replication file (TOML or JSON) into a dict of RunConfig fields (+ extra keys kept)."""
    path = Path(path)
    if not path.is_file():
        raise KlgapError(f"config file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise KlgapError(f"cannot parse config file {str(path)!r}: {exc}") from exc
