"""The measurement engine: patch substitutes x' into the model and reduce logits to per-token records.

Modes (METHOD.md §3):
- all_tokens:   patch every measured position of each context; KL and ΔCE at every position.
- single_token: patch only `position` t; measure positions t..t+k.
- many_samples: at position t, draw `n_samples` substitutes of a random perturbation; the SAE's KL
                gets a z-score against them.
Logits never outlive their batch: each batch is reduced to a table of per-token scalars and written
to the run folder before the next batch starts (so a killed run resumes where it stopped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from klgap import activations, metrics
from klgap.config import RunConfig, parse_intervention
from klgap.errors import KlgapError, unknown
from klgap.plugins import get_host
from klgap.protocols import LoadedModel, LoadedSAE, Perturbation, SiteSpec
from klgap.rundir import RunDir, atomic_write_json
from klgap.sites import hook_name, parse_hook_name

log = logging.getLogger("klgap")


@dataclass
class Prepared:
    """Everything resolved and loaded for one run."""

    config: RunConfig
    model: LoadedModel
    sae: LoadedSAE
    site: str
    layer: int
    spec: SiteSpec
    perturbations: list[tuple[str, Perturbation]]
    contexts: Tensor  # [n_contexts ctx] int64, CPU
    center: bool
    sample_perturbation: Perturbation | None = None
    suffix: Any = None  # klgap.suffix.SuffixRunner when the layers above the site can be rerun alone
    cache: Any = None  # klgap.kvcache.PrefixCacheRunner: single-token / many-samples reuse positions < t
    stack: int = 1  # all-token suffix replays: interventions stacked along the batch per pass
    execution: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plugins_used: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- resolution


def pick_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KlgapError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KlgapError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def build_perturbation(spec: str) -> Perturbation:
    """`"cosine_matched:cos=0.8"` -> the registered factory called with its parameters."""
    name, params = parse_intervention(spec)
    factory = get_host().registry("perturbation").get(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise KlgapError(f"intervention {spec!r}: bad parameters {sorted(params)} ({exc})") from exc


def build_perturbations(specs: list[str]) -> list[tuple[str, Perturbation]]:
    built = [build_perturbation(s) for s in specs]
    names = [getattr(p, "name", s) for p, s in zip(built, specs, strict=True)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KlgapError(f"intervention {dupes[0]!r} is listed twice in --interventions")
    return list(zip(names, built, strict=True))


def load_sae(spec: str, device: torch.device) -> LoadedSAE:
    """Route an SAE spec to its loader: `NAME:ARG` by name, a bare path to the first loader that knows it."""
    loaders = get_host().registry("sae_loader")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in loaders:
        return loaders.get(prefix).load(rest, device)
    for name in loaders.names():
        loader = loaders.get(name)
        if loader.can_load(spec):
            return loader.load(spec, device)
    if sep and "/" not in prefix and "\\" not in prefix and len(prefix) > 1 and not Path(spec).exists():
        raise unknown("SAE loader", prefix, loaders.names())
    if not Path(spec).exists() and not sep:
        raise KlgapError(
            f"SAE {spec!r} is neither an existing path nor LOADER:ARG; valid forms: "
            "sae_lens:RELEASE/SAE_ID, a folder with cfg.json + sae_weights.safetensors, a .safetensors file"
            f" (loaders: {', '.join(loaders.names())})"
        )
    raise KlgapError(
        f"no SAE loader recognises {spec!r}; prefix it with one of: {', '.join(loaders.names())} (e.g. sae_lens:RELEASE/ID)"
    )


def default_sae(model: LoadedModel, site: str, layer: int) -> tuple[str, str]:
    """Ask every SAE loader with a `default_sae` method for a pretrained SAE at this site."""
    loaders = get_host().registry("sae_loader")
    for name in loaders.names():
        finder = getattr(loaders.get(name), "default_sae", None)
        if finder is None:
            continue
        found = finder(model, site, layer)
        if found:
            spec, note = found
            return f"{name}:{spec}", note
    raise KlgapError(
        f"no --sae given and no pretrained SAE is known for {model.name} {hook_name(site, layer)}; "
        f"train one with `klgap train-sae --model {model.name} --site {site} --layer {layer} --out DIR` "
        "and pass --sae DIR"
    )


def resolve_site(config: RunConfig, sae: LoadedSAE | None) -> tuple[str | None, int | None]:
    """Site and layer from the flags, else from the SAE's hook name; disagreement is an error."""
    site, layer = config.site, config.layer
    if sae is not None and sae.hook_name:
        sae_site, sae_layer = parse_hook_name(sae.hook_name)
        if (site is not None and site != sae_site) or (layer is not None and layer != sae_layer):
            raise KlgapError(
                f"the SAE {sae.source!r} was trained on {sae.hook_name} (site {sae_site}, layer {sae_layer}) "
                f"but --site {site} --layer {layer} was given; drop them or pick a matching SAE"
            )
        site, layer = sae_site, sae_layer
    return site, layer


_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def load_model(name: str, device: torch.device, dtype: torch.dtype, device_map: str | None = None,
               remote: bool = False) -> LoadedModel:
    """Load (or reuse) a model; `device_map` / `remote` go to adapters whose ``load`` accepts them."""
    import inspect

    key = (name, str(device), str(dtype), str(device_map), str(remote))
    if key not in _MODELS:
        from klgap.plugins import model_adapter

        adapter = model_adapter(name).adapter
        accepted = inspect.signature(adapter.load).parameters
        kwargs: dict[str, Any] = {}
        for flag, value, what in (("device_map", device_map, "--device-map"), ("remote", remote, "--remote")):
            if value:
                if flag not in accepted:
                    raise KlgapError(
                        f"model {name!r} cannot take {what}: its adapter loads it locally only; {what} works with "
                        "Hugging Face hub models (gpt2, pythia-70m-deduped, hf with KLGAP_HF_REPO, ...)"
                    )
                kwargs[flag] = value
        _MODELS.clear()  # hold at most one model in memory
        _MODELS[key] = adapter.load(device, dtype, **kwargs)
    return _MODELS[key]


def prepare(config: RunConfig, progress: bool = False) -> Prepared:
    """Validate, resolve every plugin name, load the SAE, the model and the tokens (in that order)."""
    config.validate()
    host = get_host()
    device = pick_device(config.device)
    dtype = getattr(torch, config.dtype)

    specs = list(config.interventions)
    if config.mode == "many_samples" and not any(parse_intervention(s)[0] == "sae" for s in specs):
        specs = ["sae", *specs]
    perturbations = build_perturbations(specs)
    sample_perturbation = None
    if config.mode == "many_samples":
        sample_perturbation = build_perturbation(config.sample_intervention)
        if not getattr(sample_perturbation, "stochastic", False):
            raise KlgapError(
                f"--sample-intervention {config.sample_intervention!r} is not random; many-samples mode needs "
                "one that is, e.g. epsilon_random or theta_random"
            )
    source_name, _, source_arg = config.dataset.partition(":")
    source = host.registry("token_source").get(source_name)
    from klgap.plugins import model_adapter

    model_adapter(config.model)  # an unknown name fails here, before any loading

    sae = load_sae(config.sae, device) if config.sae else None
    site, layer = resolve_site(config, sae)
    if sae is None and (site is None or layer is None):
        raise KlgapError("give --site and --layer (or an --sae whose hook name names them)")
    if site is None or layer is None:
        raise KlgapError(
            f"the SAE {sae.source!r} does not say where it was trained (no hook name); give --site and --layer"
        )

    model = load_model(config.model, device, dtype, config.device_map, config.remote)
    notes: list[str] = []
    if layer >= model.n_layers:
        raise KlgapError(f"--layer {layer} is out of range for {model.name}: valid layers are 0..{model.n_layers - 1}")
    if config.context_len > model.max_context:
        raise KlgapError(
            f"--context-len {config.context_len} exceeds {model.name}'s maximum context of {model.max_context}"
        )
    if sae is None:
        sae_spec, note = default_sae(model, site, layer)
        notes.append(note)
        log.warning(note)
        sae = load_sae(sae_spec, device)
        resolve_site(RunConfig(model=config.model, site=site, layer=layer), sae)
    width = model.site_widths[site]
    if sae.d_in != width:
        raise KlgapError(
            f"the SAE {sae.source!r} has d_in={sae.d_in} but {model.name} {site} is {width} wide; "
            "it was trained on another model or site"
        )
    center = bool(sae.info.get("config_overrides", {}).get("center_writing_weights")) and site.startswith("resid")
    if center:
        notes.append(
            "the SAE was trained with TransformerLens's center_writing_weights: resid activations are mean-centred "
            "over d_model before the SAE and every perturbation (LayerNorm makes the mean invisible downstream)"
        )

    contexts = source.contexts(
        model, config.n_contexts, config.context_len, config.seed, config.prepend_bos, source_arg or None
    )
    if contexts.shape != (config.n_contexts, config.context_len):
        raise KlgapError(
            f"token source {source_name!r} returned {tuple(contexts.shape)}, expected "
            f"{(config.n_contexts, config.context_len)}"
        )
    entries = {kind: host.registry(kind).entries for kind in ("model", "sae_loader", "token_source", "perturbation")}
    plugins_used = {
        f"model:{config.model}": model_adapter(config.model).plugin,  # a registered name, repo id or folder
        f"token_source:{source_name}": entries["token_source"][source_name].plugin,
        **{f"perturbation:{parse_intervention(s)[0]}": entries["perturbation"][parse_intervention(s)[0]].plugin for s in specs},
    }
    spec = model.site_map(site, layer)
    suffix, cache, execution = choose_execution(config, model, spec, layer, contexts)
    fitted = fit_perturbations(config, model, spec, sae, center, contexts, [p for _, p in perturbations] + [sample_perturbation])
    if fitted:
        execution = {**execution, "fitted": fitted}
    return Prepared(
        config=config,
        model=model,
        sae=sae,
        site=site,
        layer=layer,
        spec=spec,
        suffix=suffix,
        cache=cache,
        stack=int(execution.get("stack", 1)),
        execution=execution,
        perturbations=perturbations,
        contexts=contexts.to(torch.long).cpu(),
        center=center,
        sample_perturbation=sample_perturbation,
        notes=notes,
        plugins_used=plugins_used,
    )


FIT_TOKENS = 8192  # clean activations handed to perturbations that fit statistics (epsilon_anisotropic)


@torch.no_grad()
def fit_perturbations(config: RunConfig, model: LoadedModel, spec: SiteSpec, sae: LoadedSAE, center: bool,
                      contexts: Tensor, perturbations: list[Perturbation | None]) -> dict[str, Any]:
    """Call ``fit(acts [n, d])`` on every perturbation that has one, with the clean site activations of the
    run's first contexts (up to FIT_TOKENS tokens; centred like the SAE's input). Same tokens on every resume."""
    needing = [p for p in perturbations if p is not None and callable(getattr(p, "fit", None))]
    if not needing:
        return {}
    first = 1 if config.skip_first_position else 0
    per_context = config.context_len - first
    n_ctx = max(2, min(len(contexts), -(-FIT_TOKENS // per_context)))
    chunks = []
    for start in range(0, n_ctx, config.batch_size):
        ids = contexts[start:min(start + config.batch_size, n_ctx)].to(model.device)
        x = activations.collect(model, spec, ids)[:, first:].reshape(-1, sae.d_in).float()
        chunks.append(x - x.mean(-1, keepdim=True) if center else x)  # what SaeView.of hands the perturbations
    acts = torch.cat(chunks)
    acts = acts[torch.isfinite(acts).all(-1)]
    for p in needing:
        p.fit(acts)
    return {p.name: {"n_activations": int(acts.shape[0]), "n_contexts": n_ctx, "source": "the run's first contexts"}
            for p in needing}


def choose_execution(config: RunConfig, model: LoadedModel, spec: SiteSpec, layer: int, contexts: Tensor):
    """How patched runs are computed: ``(suffix_runner, cache_runner, execution_record)``.

    All-token mode reruns only the layers above the site (klgap/suffix.py); single-token and many-samples
    modes reuse the keys/values of the positions before t (klgap/kvcache.py). Either is used only when a
    check on the first contexts reproduces full forward passes; otherwise every patched run is a full
    forward pass through nnsight."""
    if not config.fast:
        return None, None, {"path": "full-forward", "reason": "--no-fast"}
    if config.mode == "all_tokens":
        runner, execution = _check_suffix(config, model, spec, layer, contexts)
        return runner, None, execution
    runner, execution = _check_prefix_cache(config, model, spec, contexts)
    return None, runner, execution


def _relative_error(pairs: list[tuple[Tensor, Tensor]], scale: Tensor) -> float:
    return float(max((a.float() - b.float()).abs().max() for a, b in pairs) / scale.abs().max().clamp(min=1.0))


def _check_suffix(config: RunConfig, model: LoadedModel, spec: SiteSpec, layer: int, contexts: Tensor):
    from klgap.suffix import SuffixRunner

    if not SuffixRunner.supported(model):
        return None, {"path": "full-forward", "reason": f"the {model.name} adapter gives no layout"}
    runner = SuffixRunner(model, spec, layer)
    ids = contexts[: min(2, len(contexts))].to(model.device)
    first = 1 if config.skip_first_position else 0
    acts, logits = runner.clean(ids)
    ref_acts, ref_logits = activations.run_clean(model, spec, ids)
    replay = runner.patched(acts[:, first:], slice(first, None))
    error = _relative_error([(logits, ref_logits), (replay, ref_logits), (acts, ref_acts)], ref_logits)
    if not error <= 1e-5:
        log.warning("suffix replay of %s differs from the model's forward (%.2g); using full forward passes", model.name, error)
        return None, {"path": "full-forward", "reason": f"replay check failed (relative error {error:.2g})"}
    execution = {"path": "suffix-replay", "first_block": runner.first, "replay_check_relative_error": error}
    stack = min(len(config.interventions), stack_size(config, model))
    if stack > 1:  # the stacked replay (two copies: the clean run and a halved site) must match too
        half = acts[:, first:] * 0.5
        stacked = runner.patched(torch.cat([acts[:, first:], half]), slice(first, None), copies=2)
        ref_half = activations.run_patched(model, spec, ids, half, positions=slice(first, None))
        n = len(ids)
        stack_error = _relative_error([(stacked[:n], ref_logits), (stacked[n:], ref_half)], ref_logits)
        if stack_error <= 1e-5:
            execution.update(stack=stack, stack_check_relative_error=stack_error)
        else:
            log.warning("stacked suffix replay of %s differs (%.2g); one intervention per pass", model.name, stack_error)
            execution.update(stack=1, stack_note=f"stack check failed (relative error {stack_error:.2g})")
    return runner, execution


STACK_BYTES_CPU = 0  # all-token mode on CPU: no stacking (benchmarks/README.md: x0.94 on a 2-core CPU)
STACK_FRACTION_CUDA = 0.25  # on CUDA: this share of the free memory at start


def stack_size(config: RunConfig, model: LoadedModel) -> int:
    """How many interventions one suffix pass can carry along the batch: each copy needs its logits (model dtype
    and a float32 view), its hidden states and its attention scores; the budget is STACK_BYTES_CPU on CPU and
    STACK_FRACTION_CUDA of the free memory on CUDA."""
    device = model.device
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * STACK_FRACTION_CUDA)
    elif device.type == "cpu":
        budget = STACK_BYTES_CPU
    else:
        return 1
    element = torch.finfo(model.dtype).bits // 8
    tokens = config.batch_size * config.context_len
    heads = int(getattr(getattr(model.hf_model, "config", None), "num_attention_heads", None) or 16)
    per_copy = tokens * (model.vocab_size * (element + 4) + model.d_model * 4 * 16) + config.batch_size * heads * config.context_len**2 * 4
    return max(1, budget // per_copy)


def _check_prefix_cache(config: RunConfig, model: LoadedModel, spec: SiteSpec, contexts: Tensor):
    from klgap.kvcache import PrefixCacheRunner

    t = config.position
    if t < 1 or not PrefixCacheRunner.supported(model):
        return None, {"path": "full-forward", "reason": "position 0 has no prefix" if t < 1 else f"{model.name} has no KV cache"}
    n_tail = config.k + 1 if config.mode == "single_token" else 1
    ids = contexts[: min(2, len(contexts)), : t + n_tail].to(model.device)
    runner = PrefixCacheRunner(model, spec)
    try:
        acts, logits = runner.clean(ids, t)
        ref_acts, ref_logits = activations.run_clean(model, spec, ids)
        x_half = ref_acts[:, t] * 0.5  # a real patch, not only x' = x
        replay = runner.patched(ids[:, t:], ref_acts[:, t])
        halved = runner.patched(ids[:, t:], x_half)
        ref_halved = activations.run_patched(model, spec, ids, x_half, positions=t)
    except Exception as exc:  # noqa: BLE001 - an architecture whose cache cannot be reused this way
        log.warning("KV-cache reuse failed on %s (%s); using full forward passes", model.name, exc)
        return None, {"path": "full-forward", "reason": f"KV cache unusable: {type(exc).__name__}: {exc}"}
    error = _relative_error(
        [(logits, ref_logits[:, t:]), (replay, ref_logits[:, t:]), (halved, ref_halved[:, t:]), (acts, ref_acts[:, t:])],
        ref_logits,
    )
    if not error <= 1e-5:
        log.warning("KV-cache replay of %s differs from the model's forward (%.2g); using full forward passes", model.name, error)
        return None, {"path": "full-forward", "reason": f"KV-cache check failed (relative error {error:.2g})"}
    return runner, {"path": "kv-cache", "positions_recomputed": n_tail, "replay_check_relative_error": error}


# ----------------------------------------------------------------------------- measuring


def generator_for(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded from (seed, batch, intervention, ...): the same numbers on resume."""
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


@dataclass
class SaeView:
    """The SAE's view of a set of tokens: x (possibly centred), x̂ and per-token geometry."""

    x: Tensor  # [n d] float32
    x_hat: Tensor  # [n d] float32
    offset: Tensor  # [n 1] float32: added back before patching (the mean when centring, else 0)
    stats: dict[str, Tensor]  # eps, cos, x_norm, x_hat_norm, l0: [n] each

    @classmethod
    def of(cls, acts: Tensor, sae: LoadedSAE, center: bool) -> "SaeView":
        x = acts.float()
        offset = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[:, :1])
        x = x - offset
        feats = sae.encode(x)
        x_hat = sae.decode(feats).float()
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        stats = {
            "eps": (x - x_hat).norm(dim=-1),
            "cos": cos,
            "x_norm": x_norm,
            "x_hat_norm": x_hat_norm,
            "l0": (feats != 0).sum(-1).float(),
        }
        return cls(x, x_hat, offset, stats)

    def substitute(self, perturbation: Perturbation, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        x_prime = perturbation(self.x, self.x_hat, generator)
        return (x_prime.float() + self.offset).to(dtype)

    def side_stats(self) -> dict[str, Any]:
        """Sums for explained variance over the whole run: n, Σx, Σ‖x‖², Σ‖x − x̂‖²."""
        finite = torch.isfinite(self.x).all(-1) & torch.isfinite(self.x_hat).all(-1)
        x, err = self.x[finite].double(), (self.x - self.x_hat)[finite].double()
        return {
            "n": int(finite.sum()),
            "n_nonfinite_acts": int((~finite).sum()),
            "sum_x": x.sum(0).cpu().tolist(),
            "sum_sq_x": float((x**2).sum()),
            "sum_sq_err": float((err**2).sum()),
        }


def _table(columns: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else v) for k, v in columns.items()})


def measure_batch(prep: Prepared, index: int, clean: tuple[Tensor, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Reduce one batch of contexts to per-token records (and side sums).

    clean: all-token mode, the batch's clean (site activation, logits or metrics.CleanReference) when a shared
    forward already ran it."""
    mode = prep.config.mode
    if mode == "all_tokens":
        return _measure_all_tokens(prep, index, clean)
    if mode == "single_token":
        return _measure_single_token(prep, index)
    return _measure_many_samples(prep, index)


def _batch_ids(prep: Prepared, index: int) -> tuple[Tensor, Tensor]:
    size = prep.config.batch_size
    context_ids = torch.arange(index * size, min((index + 1) * size, len(prep.contexts)))
    return prep.contexts[context_ids], context_ids


@torch.no_grad()
def _measure_all_tokens(prep: Prepared, index: int, clean: tuple[Tensor, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model = prep.config, prep.model
    ids_cpu, context_ids = _batch_ids(prep, index)
    ids = ids_cpu.to(model.device)
    n_ctx, ctx_len = ids.shape
    first = 1 if cfg.skip_first_position else 0
    n_pos = ctx_len - first

    if clean is not None:
        acts, clean_logits = clean
    elif prep.suffix is not None:
        acts, clean_logits = prep.suffix.clean(ids)  # [b pos d], [b pos vocab]
    else:
        acts, clean_logits = activations.run_clean(model, prep.spec, ids)
    # once per batch, shared by every intervention (and, in a study, by every site: run_shared builds it)
    clean_ref = clean_logits if isinstance(clean_logits, metrics.CleanReference) else metrics.CleanReference.of(clean_logits)
    del clean_logits
    view = SaeView.of(acts[:, first:].reshape(n_ctx * n_pos, -1), prep.sae, prep.center)
    next_ids = metrics.next_token_ids(ids)

    base = {
        "context": context_ids.repeat_interleave(n_pos),
        "position": torch.arange(first, ctx_len).repeat(n_ctx),
        "token_id": ids_cpu[:, first:].reshape(-1),
        **view.stats,
    }
    base["offset"] = base["position"]
    frames = []
    stack = prep.stack if prep.suffix is not None else 1
    indexed = list(enumerate(prep.perturbations))  # j keys each substitute's generator
    for start in range(0, len(indexed), stack):
        group = indexed[start : start + stack]
        x_primes = [
            view.substitute(perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype).reshape(n_ctx, n_pos, -1)
            for j, (_, perturbation) in group
        ]
        if prep.suffix is not None:  # one pass for the group, its substitutes stacked along the batch
            logits_of = prep.suffix.patched(torch.cat(x_primes), slice(first, None), copies=len(group)).split(n_ctx)
        else:
            logits_of = [activations.run_patched(model, prep.spec, ids, x_prime, positions=slice(first, None)) for x_prime in x_primes]
        del x_primes
        for (_, (name, _)), logits in zip(group, logits_of, strict=True):
            kl, ce = clean_ref.measure(logits, next_ids)
            frames.append(_table({**base, "intervention": name, "draw": -1, "kl": kl[:, first:].reshape(-1), "ce_delta": ce[:, first:].reshape(-1)}))
        del logits_of, logits
    return pd.concat(frames, ignore_index=True), view.side_stats()


@torch.no_grad()
def _measure_single_token(prep: Prepared, index: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model = prep.config, prep.model
    full_cpu, context_ids = _batch_ids(prep, index)
    t, k = cfg.position, cfg.k
    # A causal model's logits at positions <= t+k do not depend on later tokens: run only what is measured.
    ids = full_cpu[:, : t + k + 1].to(model.device)
    next_ids = metrics.next_token_ids(full_cpu.to(model.device))[:, : t + k + 1]
    n_ctx = ids.shape[0]

    if prep.cache is not None:  # positions < t come from the KV cache: everything below is positions t..t+k
        acts, clean_logits = prep.cache.clean(ids, t)
        ids_tail, next_tail, at = ids[:, t:], next_ids[:, t:], 0
    else:
        acts, clean_logits = activations.run_clean(model, prep.spec, ids)
        ids_tail, next_tail, at = ids, next_ids, t
    clean_ref = metrics.CleanReference.of(clean_logits)
    del clean_logits
    view = SaeView.of(acts[:, at], prep.sae, prep.center)  # [b d]
    positions = torch.arange(t, t + k + 1)
    base = {
        "context": context_ids.repeat_interleave(k + 1),
        "position": positions.repeat(n_ctx),
        "offset": (positions - t).repeat(n_ctx),
        "token_id": ids_cpu_at(full_cpu, positions),
        **{name: value.repeat_interleave(k + 1) for name, value in view.stats.items()},
    }
    frames = []
    for j, (name, perturbation) in enumerate(prep.perturbations):
        gen = generator_for(model.device, cfg.seed, index, j)
        x_prime = view.substitute(perturbation, gen, model.dtype)  # [b d]
        if prep.cache is not None:
            logits = prep.cache.patched(ids_tail, x_prime)
        else:
            logits = activations.run_patched(model, prep.spec, ids, x_prime, positions=t)
        kl, ce = clean_ref.measure(logits, next_tail)
        del logits
        frames.append(_table({**base, "intervention": name, "draw": -1, "kl": kl[:, at:].reshape(-1), "ce_delta": ce[:, at:].reshape(-1)}))
    return pd.concat(frames, ignore_index=True), view.side_stats()


DRAW_CHUNK_BYTES = 256 * 2**20  # many-samples: memory for one chunk of draws (its cache copy and its logits)


def _draw_chunk(prep: Prepared, n_positions: int) -> int:
    """Draws per patched forward: as many as fit DRAW_CHUNK_BYTES of activations, cache copy and logits."""
    model = prep.model
    per_row = n_positions * (model.d_model * model.n_layers * 4 + model.vocab_size) * 4  # rough, float32
    if prep.cache is not None and prep.cache.prefix is not None:
        prefix = prep.cache.prefix
        per_row += sum(layer.keys.nbytes + layer.values.nbytes for layer in prefix.layers if getattr(layer, "keys", None) is not None) // max(1, int(prefix.layers[0].keys.shape[0]))
    return int(max(1, min(4096, DRAW_CHUNK_BYTES // per_row)))


def ids_cpu_at(ids: Tensor, positions: Tensor) -> Tensor:
    """Token ids at `positions` of every context, flattened context-major."""
    return ids[:, positions].reshape(-1)


@torch.no_grad()
def _measure_many_samples(prep: Prepared, index: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model = prep.config, prep.model
    full_cpu, context_ids = _batch_ids(prep, index)
    t, n_draws = cfg.position, cfg.n_samples
    ids = full_cpu[:, : t + 1].to(model.device)  # causal: logits at t need only tokens <= t
    next_ids = metrics.next_token_ids(full_cpu.to(model.device))[:, : t + 1]
    n_ctx = ids.shape[0]

    cache = prep.cache
    if cache is not None:  # only position t is computed for every substitute; positions < t come from the cache
        acts, clean_logits = cache.clean(ids, t)
        ids, next_ids, at = ids[:, t:], next_ids[:, t:], 0
    else:
        acts, clean_logits = activations.run_clean(model, prep.spec, ids)
        at = t
    clean_ref = metrics.CleanReference.of(clean_logits[:, at : at + 1])  # [b 1 vocab]
    del clean_logits
    next_ids = next_ids[:, : at + 1]
    view = SaeView.of(acts[:, at], prep.sae, prep.center)
    base = {
        "context": context_ids,
        "position": t,
        "offset": 0,
        "token_id": full_cpu[:, t],
        **view.stats,
    }

    def patched_logits(rows: Tensor | None, x_prime: Tensor) -> Tensor:
        """Logits at t ``[n 1 vocab]`` with the site at t replaced, for contexts `rows` (None: all)."""
        if cache is not None:
            return cache.patched(ids if rows is None else ids[rows], x_prime, rows)[:, -1:]
        logits = activations.run_patched(model, prep.spec, ids if rows is None else ids[rows], x_prime, positions=t)
        return logits[:, t : t + 1]

    frames = []
    for j, (name, perturbation) in enumerate(prep.perturbations):
        gen = generator_for(model.device, cfg.seed, index, j)
        logits = patched_logits(None, view.substitute(perturbation, gen, model.dtype))
        kl, ce = clean_ref.measure(logits, next_ids[:, at : at + 1])
        frames.append(_table({**base, "intervention": name, "draw": -1, "kl": kl[:, 0], "ce_delta": ce[:, 0]}))

    # N draws per context, batched across contexts: rows are (context, draw) pairs.
    rows_per_chunk = _draw_chunk(prep, ids.shape[1])
    owner = torch.arange(n_ctx, device=model.device).repeat_interleave(n_draws)  # [b*N]
    x_rep, x_hat_rep, off_rep = view.x[owner], view.x_hat[owner], view.offset[owner]
    draws = []
    for j in range(n_ctx):
        gen = generator_for(model.device, cfg.seed, index, len(prep.perturbations), j)
        sl = slice(j * n_draws, (j + 1) * n_draws)
        draws.append(prep.sample_perturbation(x_rep[sl], x_hat_rep[sl], gen).float() + off_rep[sl])
    x_prime_all = torch.cat(draws).to(model.dtype)
    kl_all, ce_all = [], []
    for start in range(0, len(owner), rows_per_chunk):
        rows = owner[start : start + rows_per_chunk]
        logits = patched_logits(rows, x_prime_all[start : start + rows_per_chunk])
        kl, ce = clean_ref.select(rows).measure(logits, next_ids[rows][:, at : at + 1])
        kl_all.append(kl[:, 0])
        ce_all.append(ce[:, 0])
        del logits
    owner_cpu = owner.cpu()
    frames.append(
        _table(
            {
                "context": context_ids[owner_cpu],
                "position": t,
                "offset": 0,
                "token_id": full_cpu[owner_cpu, t],
                **{name: value[owner] for name, value in view.stats.items()},
                "intervention": prep.sample_perturbation.name,
                "draw": torch.arange(n_draws).repeat(n_ctx),
                "kl": torch.cat(kl_all),
                "ce_delta": torch.cat(ce_all),
            }
        )
    )
    return pd.concat(frames, ignore_index=True), view.side_stats()


# ----------------------------------------------------------------------------- the run


def run_identity(prep: Prepared) -> dict[str, Any]:
    """What makes two runs the same run (resume only into an identical one)."""
    identity = prep.config.to_dict()
    identity.pop("fast")  # both execution paths give the same numbers (tests/core/test_engine.py)
    identity.update(site=prep.site, layer=prep.layer, sae=prep.sae.source, device=str(prep.model.device))
    return identity


@dataclass
class OpenRun:
    """A run bound to its folder: what is prepared, and which batches it still has to measure."""

    prep: Prepared
    rundir: RunDir
    mine: list[int]  # this run's (or shard's) batches
    todo: list[int]  # those not measured yet
    shard: tuple[int, int] | None = None


def open_run(config: RunConfig, out: str | Path, overwrite: bool = False,
             shard: tuple[int, int] | None = None) -> OpenRun:
    """Prepare a run and bind it to `out` (resuming what is there)."""
    rundir = RunDir(out)
    rundir.check_writable()
    prep = prepare(config)
    identity = run_identity(prep)
    if shard is not None:
        identity["shard"] = f"{shard[0]}/{shard[1]}"
    rundir.prepare(identity, overwrite)
    done = rundir.done_batches()
    n_batches = -(-len(prep.contexts) // config.batch_size)
    mine = [i for i in range(n_batches) if shard is None or i % shard[1] == shard[0] - 1]
    todo = [i for i in mine if i not in done]
    if done:
        log.warning("resuming: %d of %d batches already done in %s", len(mine) - len(todo), len(mine), rundir.root)
    return OpenRun(prep, rundir, mine, todo, shard)


def finish_run(run_: OpenRun) -> dict[str, Any] | None:
    """Write the report and tokens table from the parts (a shard writes only its shard.json)."""
    from klgap.report import build_report
    from klgap.schema import validate_report

    rundir, prep = run_.rundir, run_.prep
    if run_.shard is not None:
        n_batches = -(-len(prep.contexts) // prep.config.batch_size)
        atomic_write_json(rundir.root / "shard.json", {"shard": list(run_.shard), "batches": run_.mine, "n_batches": n_batches})
        return None
    frame, sides = rundir.read_parts()
    report = build_report(prep, frame, sides)
    validate_report(report, source="the report just built")  # never write a report that does not validate
    del frame
    rundir.write_tokens(rundir.root / "tokens.parquet")
    atomic_write_json(rundir.root / "report.json", report)
    return report


def run(config: RunConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
        shard: tuple[int, int] | None = None) -> dict[str, Any] | None:
    """Measure, writing per-batch parts as it goes; resume a killed run; write report + tokens table.

    ``shard=(i, n)`` measures only batches ``b`` with ``b % n == i - 1`` and writes no report (None is
    returned): `klgap merge` joins the n shards' parts into the report of the unsharded run.
    """
    opened = open_run(config, out, overwrite, shard)
    _measure_todo(opened, progress)
    return finish_run(opened)


def _measure_todo(opened: OpenRun, progress: bool) -> None:
    """Measure the batches an open run still has to do, writing each part as it is finished."""
    from tqdm.auto import tqdm

    prep, shard = opened.prep, opened.shard
    tag = f" shard {shard[0]}/{shard[1]}" if shard else ""
    for index in tqdm(opened.todo, desc=f"{prep.config.mode} {prep.site} L{prep.layer}{tag}", disable=not progress, unit="batch"):
        opened.rundir.write_part(index, *measure_batch(prep, index))


def run_shared(configs: list[RunConfig], outs: list[Path], overwrite: bool = False, progress: bool = True,
               shard: tuple[int, int] | None = None) -> list[dict[str, Any] | None]:
    """Several all-token runs on one model and the same tokens (a study's sites/layers): each batch's clean
    forward runs once for all of them, then each reruns only the layers above its own site.

    Falls back to one run after another when a run cannot share (another mode, no suffix replay, other tokens).
    Per-token numbers are those of separate runs (tests/core/test_engine.py)."""
    from tqdm.auto import tqdm

    from klgap.suffix import shared_clean

    opened = [open_run(c, o, overwrite, shard) for c, o in zip(configs, outs, strict=True)]
    first = opened[0].prep
    can_share = len(opened) > 1 and all(
        o.prep.config.mode == "all_tokens" and o.prep.suffix is not None and o.prep.model is first.model
        and torch.equal(o.prep.contexts, first.contexts) and o.prep.config.batch_size == first.config.batch_size
        for o in opened
    )
    if not can_share:
        for o in opened:
            _measure_todo(o, progress)
        return [finish_run(o) for o in opened]
    indices = sorted(set().union(*(o.todo for o in opened)))
    for index in tqdm(indices, desc=f"all_tokens, {len(opened)} sites/layers, shared clean forward", disable=not progress, unit="batch"):
        need = [o for o in opened if index in o.todo]
        ids = _batch_ids(first, index)[0].to(first.model.device)
        clean_ref = metrics.CleanReference.of(shared_clean([o.prep.suffix for o in need], ids))
        for o in need:
            o.rundir.write_part(index, *measure_batch(o.prep, index, clean=(o.prep.suffix.site_value, clean_ref)))
            o.prep.suffix.site_value = None
    for o in opened:
        o.prep.execution["clean_forward"] = f"shared by {len(opened)} sites/layers"
    return [finish_run(o) for o in opened]
