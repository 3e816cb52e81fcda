"""sae_lens pretrained releases by name (`sae_lens:RELEASE/SAE_ID`), and the default SAE for a site."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from klgap.errors import HubUnavailableError, KlgapError, unknown
from klgap.protocols import LoadedModel, LoadedSAE, ModelSAENames, SAECheck
from klgap.plan.sites import hook_name, parse_hook_name
from klgap_saes.common import wrap_sae_lens

if TYPE_CHECKING:
    import torch

#: (sae_lens model, site) -> the release the study (or its comment) used, when several exist.
PREFERRED = {
    ("gpt2-small", "resid_pre"): "gpt2-small-res-jb",
    ("gpt2-small", "attn_z"): "gpt2-small-hook-z-kk",
    ("gpt2-small", "attn_out"): "gpt2-small-attn-out-v5-32k",
    ("gpt2-small", "mlp_out"): "gpt2-small-mlp-out-v5-32k",
    ("gpt2-small", "resid_post"): "gpt2-small-resid-post-v5-32k",
    ("pythia-70m-deduped", "resid_post"): "pythia-70m-deduped-res-sm",
    ("pythia-70m-deduped", "resid_pre"): "pythia-70m-deduped-res-sm",
    ("pythia-70m-deduped", "mlp_out"): "pythia-70m-deduped-mlp-sm",
    ("pythia-70m-deduped", "attn_out"): "pythia-70m-deduped-att-sm",
}


@lru_cache(maxsize=1)
def directory() -> dict[str, Any]:
    """sae_lens's bundled pretrained-SAE directory (release -> lookup); no network."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


@lru_cache(maxsize=1)
def release_overrides() -> dict[str, dict[str, Any]]:
    """release -> config_overrides from the bundled yaml (e.g. center_writing_weights for gpt2-small-res-jb)."""
    from importlib.resources import files

    import yaml

    with files("sae_lens").joinpath("pretrained_saes.yaml").open() as handle:
        data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out = {}
    for release, value in data.items():
        overrides = (value.get("config_overrides") or {}).get("model_from_pretrained_kwargs") or {}
        if overrides:
            out[release] = overrides
    return out


def is_hook_name(sae_id: str) -> bool:
    """An SAE id that is a hook name klgap reads a site and layer from (``blocks.6.hook_resid_pre``)."""
    try:
        parse_hook_name(sae_id)
    except KlgapError:
        return False
    return True


def split_spec(spec: str) -> tuple[str, str]:
    """`RELEASE/SAE_ID` -> (release, sae_id); the release is the longest known prefix before a '/'."""
    releases = directory()
    parts = spec.split("/")
    for cut in range(len(parts) - 1, 0, -1):
        release = "/".join(parts[:cut])
        if release in releases:
            return release, "/".join(parts[cut:])
    if "/" not in spec:
        raise KlgapError(f"sae_lens SAE {spec!r} must be written RELEASE/SAE_ID, e.g. pythia-70m-deduped-mlp-sm/blocks.0.hook_mlp_out")
    raise unknown("sae_lens release", spec.split("/")[0], releases)


class SaeLensPretrainedLoader:
    """`sae_lens:RELEASE/SAE_ID` — a release from sae_lens's directory, downloaded from the hub by sae_lens."""

    description = "sae_lens:RELEASE/SAE_ID, a pretrained release from sae_lens's directory (needs the hub)"

    def can_load(self, spec: str) -> bool:
        return False  # only reached through the `sae_lens:` prefix

    def check(self, spec: str) -> SAECheck:
        """What `spec` names, from sae_lens's bundled directory alone (no download): release, SAE id, hook
        name (when the id is one, as in the releases klgap picks by default; an id such as Gemma Scope's
        ``layer_12/width_16k/canonical`` says no hook: --site/--layer, or the loaded SAE's cfg, tell), hub repo
        and model."""
        release, sae_id = split_spec(spec)
        lookup = directory()[release]
        if sae_id not in lookup.saes_map:
            raise unknown(f"SAE id in release {release}", sae_id, lookup.saes_map)
        return SAECheck(hook_name=sae_id if is_hook_name(sae_id) else None, repo_id=lookup.repo_id, release=release,
                        sae_id=sae_id, model=lookup.model, detail=f"sae_lens release {release}")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        from sae_lens import SAE

        release, sae_id = split_spec(spec)
        lookup = directory()[release]
        if sae_id not in lookup.saes_map:
            raise unknown(f"SAE id in release {release}", sae_id, lookup.saes_map)
        try:
            sae = SAE.from_pretrained(release, sae_id, device=str(device))
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            if isinstance(exc, KlgapError):
                raise
            raise HubUnavailableError(
                f"SAE {release}/{sae_id} needs the Hugging Face hub (repo {lookup.repo_id}), which this machine "
                f"cannot reach and which is not in the local cache ({type(exc).__name__})"
            ) from exc
        info = {
            "release": release,
            "sae_id": sae_id,
            "repo_id": lookup.repo_id,
            "directory_l0": lookup.expected_l0.get(sae_id) if lookup.expected_l0 else None,
            "directory_variance_explained": lookup.expected_var_explained.get(sae_id) if lookup.expected_var_explained else None,
        }
        overrides = release_overrides().get(release, {})
        if overrides:
            info["config_overrides"] = overrides  # provenance; the engine reads center_resid
        return wrap_sae_lens(sae, f"sae_lens:{release}/{sae_id}", device, info,
                             center_resid=bool(overrides.get("center_writing_weights")))

    def default_sae(self, model: LoadedModel | ModelSAENames, site: str, layer: int) -> tuple[str, str] | None:
        """The study's release for this model/site when sae_lens lists one (no download)."""
        wanted = {hook_name(site, layer)}
        if site == "attn_z":
            wanted.add(f"blocks.{layer}.hook_z")
        releases = directory()
        for sae_model in model.sae_lens_models:
            candidates = [PREFERRED.get((sae_model, site))] + sorted(releases)
            for release in filter(None, candidates):
                lookup = releases.get(release)
                if lookup is None or lookup.model != sae_model:
                    continue
                for sae_id in lookup.saes_map:
                    if sae_id in wanted:
                        note = f"no --sae given: using sae_lens release {release}, SAE {sae_id}"
                        if model.sae_note:
                            note += f" ({model.sae_note})"
                        return f"{release}/{sae_id}", note
        return None
