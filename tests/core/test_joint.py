"""Joint runs (klgap/job/plan.py, klgap/forward/joint.py): several sites patched in one forward, against plain
forwards with hooks."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.job import loading
from klgap.job.cells import prepare
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.job.patch import SiteSwap
from klgap.job.plan import plan_job
from klgap.job.view import draw_generator
from klgap.plan.resolve import build_intervention
from klgap.report.read import load_report
from klgap.plan.sites import hook_name
from tests.close import assert_identical_frames
from tests.helpers import random_sae, run_config, shrink_sae

SMALL = {"tokens": 4 * 32, "context_len": 32, "batch_size": 2, "device": "cpu", "dataset": "random"}


def _saes(tmp_path, lm, cells, make=random_sae, **kw):
    folder = tmp_path / "saes"
    folder.mkdir(exist_ok=True)
    for k, (site, layer) in enumerate(cells):
        path = folder / f"{site}-L{layer}.safetensors"
        if make is random_sae:
            random_sae(path, lm.site_widths[site], 4 * lm.site_widths[site], hook_name(site, layer), seed=k)
        else:
            make(path, lm.site_widths[site], hook_name=hook_name(site, layer), **kw)
    return str(folder / "{site}-L{layer}.safetensors")


def _rows(frame):
    """A joint run's rows without its per-site patch sizes (site{k}_eps, ...): the columns a site alone has."""
    return frame.drop(columns=[c for c in frame if c.startswith("site")])


def _joint(tmp_path, name, **kw):
    config = RunConfig(**{**SMALL, "joint": True, **kw})
    report = run_config(config, tmp_path / name, progress=False)
    return report, pd.read_parquet(tmp_path / name / "tokens.parquet")


@pytest.mark.parametrize("no_fast", [False, True])
def test_identity_sae_at_every_site_gives_zero_kl(tmp_path, load_model, no_fast):
    lm = load_model("tiny-llama")
    cells = [("resid_post", 0), ("resid_post", 1), ("mlp_out", 0), ("mlp_out", 1)]
    template = _saes(tmp_path, lm, cells, shrink_sae, scale=1.0)
    report, tokens = _joint(tmp_path, "run", model="tiny-llama", site="resid_post,mlp_out", layer="0,1",
                            sae=template, interventions=["sae", "epsilon_random"], no_fast=no_fast)
    in_forward_order = [("mlp_out", 0), ("resid_post", 0), ("mlp_out", 1), ("resid_post", 1)]
    assert [s.hook_name for s in report.joint] == [hook_name(s, v) for s, v in in_forward_order]
    assert report.execution["path"] == ("joint-full-forward" if no_fast else "joint-suffix-replay")
    assert len(tokens) == 2 * 4 * 31
    assert tokens.kl.abs().max() < 1e-6  # x̂ = x and ε = 0 at every site
    assert np.nanmax(np.abs(tokens.ce_delta)) < 1e-6


@pytest.mark.parametrize("no_fast", [False, True])
def test_one_site_joint_equals_the_single_site_run(tmp_path, load_model, no_fast):
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("resid_pre", 1)])
    names = ["sae", "epsilon_random", "theta_random", "sae_norm"]
    joint, joint_tokens = _joint(tmp_path, "joint", model="tiny-gpt2", site="resid_pre", layer="1", sae=template,
                                 interventions=names, no_fast=no_fast, joint_baseline="reencoded")
    single_config = RunConfig(**SMALL, model="tiny-gpt2", site="resid_pre", layer=1, no_fast=no_fast,
                              sae=template.format(site="resid_pre", layer=1), interventions=names)
    single = run_config(single_config, tmp_path / "single", progress=False)
    single_tokens = pd.read_parquet(tmp_path / "single" / "tokens.parquet")
    # bit for bit on the fast path (the same suffix replay); the full forward hooks the module nnsight patches
    pd.testing.assert_frame_equal(_rows(joint_tokens), single_tokens, check_exact=not no_fast, rtol=0, atol=1e-6)
    # the patch sizes recorded: the SAE's ε at the one site is its clean error (the rows' eps)
    sae = joint_tokens[joint_tokens.intervention == "sae"]
    np.testing.assert_allclose(sae.site0_eps, sae.eps, rtol=1e-5)
    np.testing.assert_allclose(sae.site0_cos, sae.cos, rtol=1e-5)
    np.testing.assert_allclose(sae.site0_x_norm, sae.x_norm, rtol=1e-6)
    np.testing.assert_array_equal(sae.site0_l0, sae.l0)
    assert joint_tokens[joint_tokens.intervention == "epsilon_random"].site0_l0.notna().all()  # reencoded
    assert joint.interventions["sae"].kl_mean == pytest.approx(single.interventions["sae"].kl_mean, abs=1e-9)
    assert joint.interventions["sae"].kl_mean > 1e-4
    alone = pd.read_parquet(tmp_path / "joint" / "single" / "resid_pre_L01" / "tokens.parquet")
    assert_identical_frames(alone, single_tokens)  # the same code and executor as a single-site run
    found = joint.compounding
    assert found.joint_kl_ratio.ratio == pytest.approx(found.sites[0].kl_ratio.ratio, rel=1e-6)
    for name in names:
        assert found.additivity[name].joint_over_sum.ratio == pytest.approx(1.0, abs=1e-6)


def test_a_joint_run_drops_the_last_position_as_its_sites_do(tmp_path, load_model):
    """--drop-last-position: the joint rows, like each site's alone, patch the last position and do not measure it
    (one batch loop for both); with one site the joint run is the single-site run."""
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("resid_pre", 1)])
    kw = {"model": "tiny-gpt2", "site": "resid_pre", "sae": template, "interventions": ["sae", "epsilon_random"],
          "drop_last_position": True}
    _, joint_tokens = _joint(tmp_path, "joint", layer="1", **kw)
    assert joint_tokens.position.max() == SMALL["context_len"] - 2
    pd.testing.assert_frame_equal(_rows(joint_tokens), pd.read_parquet(tmp_path / "joint" / "single" / "resid_pre_L01" /
                                                                "tokens.parquet"))


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
def test_fast_path_equals_full_forwards(tmp_path, load_model, model):
    lm = load_model(model)
    cells = [("attn_out", 0), ("mlp_out", 0), ("attn_out", 1), ("mlp_out", 1)]
    template = _saes(tmp_path, lm, cells)
    kw = {"model": model, "site": "attn_out,mlp_out", "layer": "0,1", "sae": template,
          "interventions": ["sae", "epsilon_random", "theta_random", "epsilon_anisotropic"]}
    fast, fast_tokens = _joint(tmp_path, "fast", **kw)
    full, full_tokens = _joint(tmp_path, "full", no_fast=True, **kw)
    assert fast.execution["path"] == "joint-suffix-replay" and full.execution["path"] == "joint-full-forward"
    assert fast.execution["replay_check_relative_error"] <= 1e-5
    np.testing.assert_allclose(fast_tokens.kl, full_tokens.kl, rtol=1e-4, atol=1e-7)
    assert fast_tokens.kl.mean() > 1e-4


@torch.no_grad()
def _hand_joint_kl(lm, saes, ids):
    """KL of the SAE patched at every site in turn, by a plain Hugging Face forward with hooks."""
    model = lm.hf_model
    clean = model(input_ids=ids, use_cache=False).logits
    handles = []
    for (site, layer), sae in saes:
        spec = lm.site_map(site, layer)

        def swap(module, args, output, sae=sae, spec=spec):
            tensor = output if spec.index is None else output[spec.index]
            x = tensor[:, 1:].reshape(-1, tensor.shape[-1])
            new = tensor.clone()
            new[:, 1:] = sae.decode(sae.encode(x)).reshape(new[:, 1:].shape)
            return new if spec.index is None else (*output[: spec.index], new, *output[spec.index + 1 :])

        assert spec.io == "output"
        handles.append(model.get_submodule(spec.module).register_forward_hook(swap))
    try:
        patched = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    logp, logq = torch.log_softmax(clean.double(), -1), torch.log_softmax(patched.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)[:, 1:]


def test_each_site_sees_the_activation_the_patched_forward_gives_it(tmp_path, load_model):
    """The joint KL is that of splicing each SAE in at its site of one forward, lowest first: the higher SAE
    encodes the activation the lower patch produced (not the clean one)."""
    from klgap.job.loading import load_sae

    lm = load_model("tiny-llama")
    cells = [("mlp_out", 0), ("resid_post", 0), ("mlp_out", 1), ("resid_post", 1)]  # the order of the forward
    template = _saes(tmp_path, lm, cells)
    report, tokens = _joint(tmp_path, "run", model="tiny-llama", site="resid_post,mlp_out", layer="0,1",
                            sae=template, interventions=["sae", "epsilon_random"])
    contexts = prepare(RunConfig(**SMALL, model="tiny-llama", site="resid_post", layer=0,
                                        sae=template.format(site="resid_post", layer=0))).contexts
    saes = [(cell, load_sae(template.format(site=cell[0], layer=cell[1]), torch.device("cpu")).module)
            for cell in cells]
    expected = _hand_joint_kl(lm, saes, contexts)
    got = tokens[tokens.intervention == "sae"].sort_values(["context", "position"]).kl.to_numpy()
    np.testing.assert_allclose(got, expected.reshape(-1).numpy(), rtol=1e-4, atol=1e-7)
    alone = sum(pd.read_parquet(tmp_path / "run" / site.path / "tokens.parquet").query("intervention == 'sae'").kl.mean()
                for site in report.joint)
    assert report.compounding.additivity["sae"].sum_single_kl_mean == pytest.approx(alone, rel=1e-5)
    assert abs(got.mean() - alone) > 1e-6  # the joint run is not the sum of the single runs


def test_epsilon_draws_are_independent_per_site(load_model, tmp_path):
    lm = load_model("tiny-gpt2")
    sae = loading.load_sae(random_sae(tmp_path / "s.safetensors", lm.d_model, 64, hook_name("resid_pre", 1)).as_posix(),
                          torch.device("cpu"))
    run = type("Run", (), {"sae": sae, "center": False, "model": lm})()
    eps = build_intervention("epsilon_random").perturbation
    tensor = torch.randn(2, 8, lm.d_model, generator=torch.Generator().manual_seed(0))
    draws = [SiteSwap(run, eps, draw_generator(torch.device("cpu"), 0, 3, "epsilon_random", site=k), slice(1, None))(tensor) for k in range(3)]
    view_error = (tensor - SiteSwap(run, build_intervention("sae").perturbation, torch.Generator(), slice(1, None))(tensor))[:, 1:]
    for k, draw in enumerate(draws):
        assert torch.equal(draw[:, 0], tensor[:, 0])  # the first position is left as it is
        # each draw keeps the SAE's error norm, token by token
        torch.testing.assert_close((draw - tensor)[:, 1:].norm(dim=-1), view_error.norm(dim=-1), rtol=1e-5, atol=1e-6)
        for other in draws[k + 1 :]:
            cos = torch.nn.functional.cosine_similarity((draw - tensor)[:, 1:], (other - tensor)[:, 1:], dim=-1)
            assert cos.abs().max() < 0.9  # independent directions, not the same draw
    # the lowest site draws as a single-site run does (one site joint == single-site run)
    assert torch.equal(draw_generator(torch.device("cpu"), 0, 3, "epsilon_random", site=0).get_state(),
                       draw_generator(torch.device("cpu"), 0, 3, "epsilon_random").get_state())


def test_joint_inputs_are_checked(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("resid_pre", 0), ("resid_pre", 1)])
    with pytest.raises(KlgapError, match="names one SAE but several sites/layers"):
        plan_job(RunConfig(model="tiny-gpt2", site="resid_pre", layer="0,1", joint=True,
                           sae=template.format(site="resid_pre", layer=0)))
    with pytest.raises(KlgapError, match="--joint needs --site and --layer"):
        plan_job(RunConfig(model="tiny-gpt2", joint=True, sae=template))
    with pytest.raises(KlgapError, match="not all"):
        plan_job(RunConfig(model="tiny-gpt2", site="resid_pre", layer="all", joint=True, sae=template))
    job = plan_job(RunConfig(model="tiny-gpt2", site="resid_pre", layer="1,0", joint=True, sae=template))
    assert [(p.site, p.layer) for p in job.plans] == [("resid_pre", 0), ("resid_pre", 1)]
    assert [cell.path for cell in job.cells] == ["single/resid_pre_L00", "single/resid_pre_L01", "."]


def test_measure_joint_from_python(tmp_path, load_model):
    import klgap
    from klgap.job.loading import load_sae

    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("resid_pre", 0), ("resid_pre", 1)])
    by_spec = klgap.measure("tiny-gpt2", template, site="resid_pre", layer=[0, 1], joint=True,
                            interventions="sae,epsilon_random", progress=False, **SMALL)
    objects = [load_sae(template.format(site="resid_pre", layer=v), torch.device("cpu")).module for v in (0, 1)]
    by_object = klgap.measure("tiny-gpt2", objects, site="resid_pre", layer=[0, 1], joint=True,
                              interventions="sae,epsilon_random", progress=False, **SMALL)
    assert by_spec.report.compounding is not None and len(by_spec.report.compounding.sites) == 2
    assert by_object.report.interventions["sae"].kl_mean == pytest.approx(by_spec.report.interventions["sae"].kl_mean,
                                                                          rel=1e-6)
    # without joint=True: one run per SAE (each at its own site and layer), the numbers of the joint run's sites alone
    study = klgap.measure("tiny-gpt2", objects, interventions="sae,epsilon_random", progress=False, **SMALL)
    assert [run.path for run in study.report.runs] == ["resid_pre_L00", "resid_pre_L01"]
    for run, site in zip(study.runs, by_spec.report.compounding.sites, strict=True):
        assert run.report.interventions["sae"].kl_mean == pytest.approx(site.kl_mean["sae"], rel=1e-6)


def test_single_token_joint(tmp_path, load_model):
    """Single-token mode patches position t at every site; with one site it is the single-site run."""
    lm = load_model("tiny-pythia")
    template = _saes(tmp_path, lm, [("resid_pre", 0), ("resid_pre", 1)])
    mode = {"mode": "single_token", "position": 5, "k": 3, "interventions": ["sae", "epsilon_random"]}
    one, one_tokens = _joint(tmp_path, "one", model="tiny-pythia", site="resid_pre", layer="1", sae=template,
                             no_fast=True, **mode)
    single = RunConfig(**SMALL, **mode, model="tiny-pythia", site="resid_pre", layer=1, no_fast=True,
                       sae=template.format(site="resid_pre", layer=1))
    run_config(single, tmp_path / "single", progress=False)
    single_tokens = pd.read_parquet(tmp_path / "single" / "tokens.parquet")
    pd.testing.assert_frame_equal(_rows(one_tokens), single_tokens, check_exact=False, rtol=0, atol=1e-6)
    assert sorted(one_tokens.offset.unique()) == [0, 1, 2, 3]
    # the patch size at t is on each of the k + 1 measured rows: the same as the site's clean ε
    np.testing.assert_allclose(one_tokens.site0_eps, one_tokens.eps, rtol=1e-5)
    both, both_tokens = _joint(tmp_path, "both", model="tiny-pythia", site="resid_pre", layer="0,1", sae=template,
                               **mode)
    assert both.single_token is not None and both.execution["path"] == "joint-full-forward"
    assert both.compounding.additivity["sae"].joint_kl_mean > 0
    assert not np.allclose(both_tokens.kl, one_tokens.kl)  # the second site changes the numbers


def test_many_samples_joint(tmp_path, load_model):
    """Many-samples mode draws at position t of every site; with one site it is the single-site run."""
    lm = load_model("tiny-llama")
    template = _saes(tmp_path, lm, [("resid_post", 0), ("resid_post", 1)])
    mode = {"mode": "many_samples", "position": 6, "n_samples": 20, "interventions": ["sae", "epsilon_random"],
            "no_fast": True}
    one, one_tokens = _joint(tmp_path, "one", model="tiny-llama", site="resid_post", layer="1", sae=template, **mode)
    single = RunConfig(**SMALL, **mode, model="tiny-llama", site="resid_post", layer=1,
                       sae=template.format(site="resid_post", layer=1))
    alone = run_config(single, tmp_path / "single", progress=False)
    single_tokens = pd.read_parquet(tmp_path / "single" / "tokens.parquet")
    pd.testing.assert_frame_equal(_rows(one_tokens), single_tokens, check_exact=False, rtol=0, atol=1e-6)
    assert one.many_samples.z_mean == pytest.approx(alone.many_samples.z_mean, abs=1e-4)
    both, both_tokens = _joint(tmp_path, "both", model="tiny-llama", site="resid_post", layer="0,1", sae=template,
                               **mode)
    draws = both_tokens[both_tokens.draw >= 0]
    assert len(draws) == 4 * 20 and draws.kl.std() > 0
    assert both.many_samples.n_draws == 20 and both.compounding.additivity["sae"].joint_kl_mean > 0


def test_each_site_fits_its_own_perturbation(tmp_path, load_model):
    """A fitted perturbation (epsilon_anisotropic) is fitted on each site's own activations, and used there."""
    from klgap.job.cells import load_job

    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("mlp_out", 0), ("mlp_out", 1)])
    joint = load_job(plan_job(RunConfig(**SMALL, model="tiny-gpt2", site="mlp_out", layer="0,1", joint=True,
                                        sae=template, interventions=["sae", "epsilon_anisotropic"])))
    fitted = [run.interventions[1].perturbation for run in joint.runs]
    assert fitted[0] is not fitted[1]
    x = torch.randn(16, lm.d_model, generator=torch.Generator().manual_seed(1))
    draws = [p(x, x * 0.5, torch.Generator().manual_seed(0)) for p in fitted]
    assert not torch.allclose(draws[0], draws[1])  # the same draw shaped by two different site covariances


@pytest.mark.parametrize("no_fast", [False, True])
def test_each_subset_equals_its_own_joint_run(tmp_path, load_model, no_fast):
    """--joint-subsets: every pair of three sites, patched in the same pass as the joint run, gives the rows of
    that pair's own joint run (the same draws), and its compounding section reads the shared single-site runs."""
    lm = load_model("tiny-llama")
    sites = ["resid_pre", "attn_out", "mlp_out"]
    template = _saes(tmp_path, lm, [(site, 1) for site in sites])
    kw = {"model": "tiny-llama", "layer": "1", "sae": template, "no_fast": no_fast,
          "interventions": ["sae", "epsilon_random", "theta_random"]}
    report, _ = _joint(tmp_path, "all", site=",".join(sites), joint_subsets=True, **kw)
    folders = sorted(p.name for p in (tmp_path / "all" / "subsets").iterdir())
    assert folders == ["attn_out_L01+mlp_out_L01", "resid_pre_L01+attn_out_L01", "resid_pre_L01+mlp_out_L01"]
    for pair in itertools.combinations(sites, 2):
        name = "+".join(f"{site}_L01" for site in pair)
        alone, alone_tokens = _joint(tmp_path, name, site=",".join(pair), **kw)
        subset = tmp_path / "all" / "subsets" / name
        pd.testing.assert_frame_equal(pd.read_parquet(subset / "tokens.parquet"), alone_tokens, check_exact=False,
                                      rtol=1e-5, atol=1e-7)
        found = load_report(subset).compounding
        assert [s.path for s in found.sites] == [f"../../single/{site}_L01" for site in pair]
        assert found.joint_kl_ratio.ratio == pytest.approx(alone.compounding.joint_kl_ratio.ratio, rel=1e-5)
        assert found.additivity["sae"].sum_single_kl_mean == pytest.approx(
            alone.compounding.additivity["sae"].sum_single_kl_mean, rel=1e-6)
        assert alone_tokens.kl.mean() > 1e-4
    # Holm over the subsets table's one-sided p-values (the 3 pairs, then all three), computed by hand
    rows = [s.compounding.joint_minus_max_single_ratio.p_value for s in report.compounding.subsets]
    rows.append(report.compounding.joint_minus_max_single_ratio.p_value)
    order = sorted(range(4), key=lambda i: rows[i])
    expected, running = [0.0] * 4, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * rows[i]))
        expected[i] = running
    assert report.compounding.subsets_p_holm == pytest.approx(expected, abs=1e-12)
    from klgap.render.pages import render_markdown

    assert "p Holm (this table)" in render_markdown(report, [])


def test_joint_subsets_needs_three_sites():
    with pytest.raises(KlgapError, match="at least 3 sites/layers"):
        RunConfig(model="tiny-gpt2", site="resid_pre", layer="0,1", joint=True, joint_subsets=True).validate()
    with pytest.raises(KlgapError, match="add --joint"):
        RunConfig(model="tiny-gpt2", site="resid_pre", layer=0, joint_subsets=True).validate()
