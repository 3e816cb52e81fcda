"""Every mapped family, on a tiny random model saved to a folder (no downloads):

- it loads by folder path (`--model ./folder`) with its hand-written map;
- each site equals TransformerLens's ``run_with_cache`` at ``blocks.L.hook_resid_pre / hook_attn_out / hook_mlp_out /
  hook_resid_post / attn.hook_z / ln2.hook_normalized`` (mlp_in) on a HookedTransformer converted from the same weights by TransformerLens's own
  converters, to 1e-5 (float64 on both sides; TransformerLens builds rotary tables in float32, ~1e-7);
  ``TL_UNSUPPORTED`` families are checked by the rule instead: block output − input = attn_out + mlp_out;
- `replicate` runs at every site (one study, all six sites);
- the suffix-replay and KV-cache fast paths reproduce full forwards of a real patch (x' = x / 2), and the
  engine picks them for every family.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from klgap.forward import activations

from klgap.job import loading

from klgap.forward import executors
from klgap.plan.config import RunConfig
from klgap.plan.sites import SITES, hook_name
from klgap_hf.families import FAMILIES
from tests.helpers import random_sae, run_config
from tests.plugins.hf_families import TL_UNSUPPORTED, tiny_folder, tiny_model

ALL = sorted(FAMILIES)
TL_FAMILIES = [f for f in ALL if f not in TL_UNSUPPORTED]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

_FOLDERS: dict[str, object] = {}
_LOADED: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory):
    """``family_folder("qwen2")`` -> a folder holding the tiny model and tokenizer.json, written once per session."""
    root = tmp_path_factory.mktemp("families")

    def _get(model_type: str):
        if model_type not in _FOLDERS:
            _FOLDERS[model_type] = tiny_folder(model_type, root)
        return _FOLDERS[model_type]

    return _get


@pytest.fixture(scope="session")
def family_model(family_folder):
    """``family_model("qwen2", torch.float64)`` -> the folder's LoadedModel (through `--model FOLDER`), cached."""
    from klgap.plugins.manager import model_adapter

    def _get(model_type: str, dtype: torch.dtype = torch.float32):
        key = (model_type, str(dtype))
        if key not in _LOADED:
            _LOADED[key] = model_adapter(str(family_folder(model_type))).adapter.load(torch.device("cpu"), dtype)
        return _LOADED[key]

    return _get


@pytest.mark.parametrize("family", ALL)
def test_loads_by_folder_path_with_its_map(family, family_folder, family_model):
    from klgap.plugins.manager import model_adapter
    from klgap_hf.folder import FolderAdapter

    ref = model_adapter(str(family_folder(family)))
    assert isinstance(ref.adapter, FolderAdapter) and ref.name == family and ref.plugin == "hf_models"
    model = family_model(family)
    assert model.info["site_map"] == f"klgap_hf.families[{family!r}]"
    assert model.info["architecture"] == family and model.n_layers == 2 and model.d_model == 64
    assert model.vocab_size == (260 if family == "gemma3" else 257) and model.bos_token_id == 256
    assert model.tokenizer("Hi é")["input_ids"] == list("Hi é".encode())  # tokenizer.json as written
    logits = activations.run_clean(model, model.site_map("resid_pre", 0), IDS)[1]
    assert logits.shape == (2, 16, model.vocab_size) and torch.isfinite(logits).all()


FORWARD_ORDER = ("resid_pre", "attn_z", "attn_out", "mlp_in", "mlp_out", "resid_post")  # as one forward pass meets them


def _klgap_sites(model, layer: int) -> dict[str, torch.Tensor]:
    """Every site of `layer` through klgap's own reader (nnsight), from one forward pass."""
    specs = [model.site_map(site, layer) for site in FORWARD_ORDER]
    return dict(zip(FORWARD_ORDER, activations.collect_many(model, specs, IDS), strict=True))


@pytest.mark.parametrize("family", TL_FAMILIES)
def test_sites_equal_transformer_lens_hooks(family, family_model):
    from tests.plugins.hf_families import hooked_transformer

    model = family_model(family, torch.float64)
    tl_model = hooked_transformer(model.hf_model)
    # mlp_in: what TransformerLens's MLP component reads, ln2's output (its hook_normalized times the norm's weight,
    # plus its bias; resid_mid where the family has no pre-MLP norm: OLMo 2), recorded by a plain torch hook
    mlp_inputs: dict[int, torch.Tensor] = {}
    handles = [block.mlp.register_forward_pre_hook(lambda _m, args, layer=layer: mlp_inputs.__setitem__(layer, args[0]))
               for layer, block in enumerate(tl_model.blocks)]
    with torch.no_grad():
        tl_logits, cache = tl_model.run_with_cache(IDS)
        hf_logits = model.hf_model(input_ids=IDS, use_cache=False).logits
    for handle in handles:
        handle.remove()
    assert (tl_logits - hf_logits).abs().max() < 1e-5  # the conversion is faithful
    worst = 0.0
    for layer in range(model.n_layers):
        ours = _klgap_sites(model, layer)
        for site in SITES:
            theirs = mlp_inputs[layer] if site == "mlp_in" else cache[hook_name(site, layer)]
            if site == "attn_z":
                theirs = theirs.flatten(-2)  # [b pos heads d_head] -> [b pos heads*d_head]
            assert ours[site].shape == theirs.shape, (family, site, layer)
            diff = float((ours[site] - theirs).abs().max())
            assert diff < 1e-5, (family, site, layer, diff)
            worst = max(worst, diff)
    # the comparison can fail: the sublayer sites differ from each other and from the block's input by far more
    ours = _klgap_sites(model, 1)
    assert (ours["attn_out"] - ours["mlp_out"]).abs().max() > 1e-2
    assert (ours["mlp_in"] - ours["mlp_out"]).abs().max() > 1e-2
    assert (ours["resid_post"] - ours["resid_pre"]).abs().max() > 1e-2


@pytest.mark.parametrize("family", [f for f in ALL if FAMILIES[f].attn_out.module.startswith("post_")])
def test_post_norm_families_patch_after_the_norm(family, family_model):
    """Gemma 2/3 and OLMo 2: attn_out / mlp_out are the post-norms' outputs, not the attention / MLP modules'
    (the pre-norm points differ from TransformerLens's hook_attn_out by far more than the tolerance)."""
    model = family_model(family, torch.float64)
    block = f"{FAMILIES[family].blocks}.1"
    from klgap.protocols import SiteSpec

    before = activations.collect(model, SiteSpec(f"{block}.self_attn", "output", 0), IDS)
    after = activations.collect(model, model.site_map("attn_out", 1), IDS)
    assert model.site_map("attn_out", 1).module == f"{block}.post_attention_layernorm"
    assert model.site_map("mlp_out", 1).module == f"{block}.post_feedforward_layernorm"
    assert (before - after).abs().max() > 1e-1


@pytest.mark.parametrize("family", ALL)
def test_attn_out_plus_mlp_out_is_what_the_block_adds(family, family_model):
    """TransformerLens's rule for every family, TL_UNSUPPORTED ones included: resid_post = resid_pre + attn_out +
    mlp_out (sequential and parallel blocks alike), in float64."""
    model = family_model(family, torch.float64)
    for layer in range(model.n_layers):
        s = _klgap_sites(model, layer)
        error = (s["resid_pre"] + s["attn_out"] + s["mlp_out"] - s["resid_post"]).abs().max()
        assert error < 1e-12 * max(1.0, float(s["resid_post"].abs().max())), (family, layer, float(error))
        assert s["mlp_out"].abs().max() > 1e-2 and s["attn_out"].abs().max() > 1e-2


@pytest.mark.parametrize("family", sorted(TL_UNSUPPORTED))
def test_transformer_lens_really_lacks(family):
    """The families listed as unconvertible are: TransformerLens's config converter refuses them."""
    import copy
    import tempfile

    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    hf_model = tiny_model(family)
    config = copy.deepcopy(hf_model.config)
    config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        with pytest.raises(NotImplementedError, match="not currently supported"):
            convert_hf_model_config(tmp)


@pytest.mark.parametrize("family", ALL)
def test_fast_paths_reproduce_full_forwards(family, family_model):
    """Suffix replay and KV cache on a real patch (x' = x / 2) against nnsight full forwards, and the engine's own
    first-batch checks pick both fast paths."""
    from klgap.forward.kvcache import PrefixCacheRunner
    from klgap.forward.suffix import SuffixRunner

    model = family_model(family)
    contexts = torch.cat([IDS, IDS.flip(1)])
    for site in SITES:
        spec = model.site_map(site, 1)
        runner = SuffixRunner(model, spec, 1)
        acts, _ = runner.clean(IDS)
        replay = runner.patched(acts[:, 1:] * 0.5, slice(1, None))
        full = activations.run_patched(model, spec, IDS, acts[:, 1:] * 0.5, positions=slice(1, None))
        assert (replay - full).abs().max() < 1e-5 * max(1.0, float(full.abs().max())), (family, site)

        t = 9
        cache = PrefixCacheRunner(model, spec)
        acts_t, _ = cache.clean(IDS[:, : t + 3], t)
        patched = cache.patched(IDS[:, t : t + 3], acts_t[:, 0] * 0.5)
        full = activations.run_patched(model, spec, IDS[:, : t + 3], acts_t[:, 0] * 0.5, positions=t)[:, t:]
        assert (patched - full).abs().max() < 1e-5 * max(1.0, float(full.abs().max())), (family, site)

        for mode, path in (("all_tokens", "suffix-replay"), ("single_token", "kv-cache")):
            config = RunConfig(model=family, site=site, layer=1, mode=mode, position=t, k=2, context_len=16,
                               tokens=64, batch_size=2, dataset="random", interventions=["sae", "epsilon_random"])
            _, execution = executors.choose(config, model, spec, 1, contexts)
            assert execution["path"] == path, (family, site, mode, execution)


@pytest.mark.parametrize("family", ALL)
def test_replicate_runs_at_every_site(family, tmp_path, family_folder):
    """`replicate` through the engine at all six sites of layer 1 (one study), with the folder path as --model."""
    folder = str(family_folder(family))
    model = loading.load_model(folder, torch.device("cpu"), torch.float32)
    for site in SITES:
        random_sae(tmp_path / f"{site}.safetensors", model.site_widths[site], 2 * model.site_widths[site],
                   hook_name(site, 1), seed=3)
    base = RunConfig(model=folder, sae=str(tmp_path / "{site}.safetensors"), tokens=64, context_len=16,
                     batch_size=2, dataset="random", interventions=["sae", "epsilon_random"], device="cpu")
    study = run_config(dataclasses.replace(base, site=",".join(SITES), layer=1), tmp_path / "run")
    assert [run.site for run in study.runs] == list(SITES)
    for run in study.runs:
        report = json.loads((tmp_path / "run" / run.path / "report.json").read_text())
        assert report["execution"]["path"] == "suffix-replay", (family, run.site)
        assert report["kl_ratio_sae_over_epsilon_random"] > 0
        assert report["config"]["model"] == folder
