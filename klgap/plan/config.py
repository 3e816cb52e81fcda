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
from klgap.plan.specs import parse_intervention, split_interventions  # noqa: F401  (re-exported: moved to klgap.plan.specs)

MODES = ("all_tokens", "single_token", "many_samples")
DEFAULT_INTERVENTIONS = (
    "sae",
    "sae_norm_corrected",
    "sae_norm",
    "epsilon_random",
    "theta_random",
    "theta_random_xnorm",
)
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")  # float64: reference runs; auto: klgap/plan/dtypes.py


@dataclass
class RunConfig:
    """One measurement: a model, a site and layer, an SAE, interventions and a mode.

    Every field is named as its command-line flag (``--tokens`` -> ``tokens``, ``--no-bos`` -> ``no_bos``), in
    a config file and in Python alike. site/layer may be None: the SAE's own hook name then selects them.
    tokens is the number of tokens to read; contexts = ceil(tokens / context_len).
    position/k: single-token mode patches `position` and measures positions position..position+k.
    n_samples: many-samples mode draws `sample_intervention` this many times at `position`.
    include_first_position: also patch and measure position 0 (the BOS / attention-sink token).
    drop_last_position: patch the last position but do not measure it (its KL has no ΔCE beside it), as the
    study's error_eval.py does (``[:, :-1]``).
    no_bos: do not put BOS in front of each context. no_fast: every patched run a full forward pass.
    joint: patch every (site, layer) of `site` x `layer` (comma lists) in the same forward, each with its own
    SAE (`sae` a template with {site}/{layer}); klgap/job/joint.py. `layer` then holds the list.
    fit_tokens: tokens the fitted perturbations (epsilon_anisotropic, the error decomposition) are fitted on, drawn
    from the token source after the measured contexts (disjoint from them); None fits on the run's first contexts
    (up to 8192 tokens, the measured ones).
    joint_subsets: a joint run also patches every subset of two or more of its sites (but not all) together, in
    the same pass (sharing each batch's clean forward and single-site runs); each written to OUT/subsets/<name>/.
    """

    model: str
    site: str | None = None
    layer: int | None = None
    sae: str | None = None
    mode: str = "all_tokens"
    interventions: list[str] = field(default_factory=lambda: list(DEFAULT_INTERVENTIONS))
    tokens: int = 8192
    context_len: int = 128
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    dataset: str = "sample"
    no_bos: bool = False
    include_first_position: bool = False
    drop_last_position: bool = False
    position: int = 32
    k: int = 16
    n_samples: int = 500
    sample_intervention: str = "epsilon_random"
    no_fast: bool = False
    device_map: str | None = None
    remote: bool = False
    joint: bool = False
    fit_tokens: int | None = None
    joint_subsets: bool = False

    @property
    def n_contexts(self) -> int:
        return max(1, math.ceil(self.tokens / self.context_len))

    # the engine's words for the flags: derived, never stored
    @property
    def n_tokens(self) -> int:
        return self.tokens

    @property
    def skip_first_position(self) -> bool:
        return not self.include_first_position

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
                    "or --include-first-position"
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
        ``skip_first_position``, ``fast``) still work, with a deprecation note naming the new key."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            key = key.replace("-", "_")
            if key in LEGACY_KEYS:
                new, convert = LEGACY_KEYS[key]
                warnings.warn(f"config key {key!r} is deprecated: write {new} = {convert(value)!r}",
                              DeprecationWarning, stacklevel=2)
                log.warning("config key %r is deprecated: write %s = %r", key, new, convert(value))
                key, value = new, convert(value)
            if key not in names:
                raise unknown("config key", key, names)
            values[key] = value
        return cls(**values)


#: pre-0.2 config keys -> (the flag-named field, how its value converts)
LEGACY_KEYS = {
    "n_tokens": ("tokens", lambda v: v),
    "prepend_bos": ("no_bos", lambda v: not v),
    "skip_first_position": ("include_first_position", lambda v: not v),
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
