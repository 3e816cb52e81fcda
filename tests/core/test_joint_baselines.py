"""Joint runs' baselines sized by --joint-baseline, error_add, the per-site patch sizes every joint row records, and
the interactions section (klgap/job/patch.py, klgap/job/swap.py, klgap/report/interactions.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.render.pages import rebuild
from klgap.report.read import load_report
from tests.helpers import random_sae, run_config

SMALL = {"tokens": 4 * 32, "context_len": 32, "batch_size": 2, "device": "cpu", "dataset": "random"}
KEY = ["context", "position"]


def _saes(tmp_path, lm, cells):
    for k, (site, layer) in enumerate(cells):
        random_sae(tmp_path / f"{site}-L{layer}.safetensors", lm.site_widths[site], 4 * lm.site_widths[site],
                   hook_name(site, layer), seed=k)
    return str(tmp_path / "{site}-L{layer}.safetensors")


def _run(tmp_path, name, **kw):
    report = run_config(RunConfig(**{**SMALL, "joint": True, **kw}), tmp_path / name, progress=False)
    return report, pd.read_parquet(tmp_path / name / "tokens.parquet")


def _of(tokens, name):
    return tokens[(tokens.intervention == name) & (tokens.draw < 0)].sort_values(KEY).reset_index(drop=True)


SUBLAYER = [("attn_out", 1), ("mlp_out", 1), ("resid_post", 1)]  # the order of the forward


@pytest.mark.parametrize("no_fast", [False, True])
def test_matched_baselines_take_the_joint_sae_runs_patch_sizes(tmp_path, load_model, no_fast):
    """matched: at every site, each token's ε of epsilon_random equals that of the joint SAE run (which the
    baseline's own re-encoding does not give), at sublayer sites where the patches add to the stream too."""
    lm = load_model("tiny-llama")
    template = _saes(tmp_path, lm, SUBLAYER)
    kw = {"model": "tiny-llama", "site": "attn_out,mlp_out,resid_post", "layer": "1", "sae": template,
          "interventions": ["sae", "epsilon_random"], "no_fast": no_fast}
    report, tokens = _run(tmp_path, "matched", **kw)
    sae, noise = _of(tokens, "sae"), _of(tokens, "epsilon_random")
    for k in range(3):
        np.testing.assert_allclose(noise[f"site{k}_eps"], sae[f"site{k}_eps"], rtol=2e-5)
        assert sae[f"site{k}_eps"].min() > 0 and sae[f"site{k}_l0"].min() > 0
        assert noise[f"site{k}_l0"].isna().all()  # sized by a given error: no SAE code of its own
    assert not np.allclose(noise.site2_x_norm, sae.site2_x_norm)  # the two runs reach the top site differently
    found = report.compounding
    assert found.joint_baseline == "matched"
    assert [s.hook_name for s in found.patch_sizes] == [hook_name(s, v) for s, v in SUBLAYER]
    for k, size in enumerate(found.patch_sizes):
        assert size.eps_mean["epsilon_random"] == pytest.approx(size.eps_mean["sae"], rel=1e-5)
        assert size.eps_mean["sae"] == pytest.approx(sae[f"site{k}_eps"].mean(), rel=1e-6)
        assert size.l0_mean["epsilon_random"] is None
    rebuild(tmp_path / "matched")
    page = (tmp_path / "matched" / "report.md").read_text()
    assert "Baselines sized by: matched" in page and "| ε sae | ε epsilon_random |" in page
    # reencoded: the baseline's own re-encoding at the higher sites, no longer the SAE run's sizes
    _, old = _run(tmp_path, "reencoded", joint_baseline="reencoded", **kw)
    old_noise = _of(old, "epsilon_random")
    np.testing.assert_allclose(old_noise.site0_eps, sae.site0_eps, rtol=2e-5)  # the lowest site: as the SAE's
    assert np.abs(old_noise.site2_eps / sae.site2_eps - 1).max() > 1e-3
    assert old_noise.site2_l0.notna().all()


def test_clean_baselines_and_error_add_take_each_sites_error_alone(tmp_path, load_model):
    """clean: each site's ε of epsilon_random is the SAE's error on the clean activation, the ε of the site alone;
    error_add adds that same error (no re-encoding): its patch is as large."""
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [(site, layer) for site in ("resid_pre", "mlp_out") for layer in (0, 1)])
    report, tokens = _run(tmp_path, "clean", model="tiny-gpt2", site="resid_pre,mlp_out", layer="0,1",
                          sae=template, interventions=["sae", "epsilon_random", "error_add"], joint_baseline="clean")
    assert report.compounding.joint_baseline == "clean"
    order = [s.hook_name for s in report.joint]
    assert order == [hook_name(*cell) for cell in [("resid_pre", 0), ("mlp_out", 0), ("resid_pre", 1), ("mlp_out", 1)]]
    noise, added = _of(tokens, "epsilon_random"), _of(tokens, "error_add")
    for k, site in enumerate(report.joint):
        alone = pd.read_parquet(tmp_path / "clean" / site.path / "tokens.parquet")
        alone = _of(alone, "sae")
        np.testing.assert_array_equal(alone[KEY], noise[KEY])
        np.testing.assert_allclose(noise[f"site{k}_eps"], alone.eps, rtol=2e-5, err_msg=order[k])
        np.testing.assert_allclose(added[f"site{k}_eps"], alone.eps, rtol=2e-5, err_msg=order[k])
    sae = _of(tokens, "sae")
    assert np.abs(sae.site3_eps - added.site3_eps).max() > 1e-4  # the top site: re-encoding ≠ adding


def test_error_add_with_one_site_is_the_single_site_sae_run(tmp_path, load_model):
    lm = load_model("tiny-pythia")
    template = _saes(tmp_path, lm, [("resid_post", 0), ("resid_post", 1)])
    names = ["sae", "error_add", "epsilon_random"]
    _, one = _run(tmp_path, "one", model="tiny-pythia", site="resid_post", layer="1", sae=template, interventions=names)
    alone = run_config(RunConfig(**SMALL, model="tiny-pythia", site="resid_post", layer=1, interventions=names,
                                 sae=template.format(site="resid_post", layer=1)), tmp_path / "alone", progress=False)
    alone_tokens = pd.read_parquet(tmp_path / "alone" / "tokens.parquet")
    np.testing.assert_allclose(_of(one, "error_add").kl, _of(alone_tokens, "sae").kl, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(_of(alone_tokens, "error_add").kl, _of(alone_tokens, "sae").kl)  # alone: x̂
    assert alone.interventions["sae"].kl_mean > 1e-4
    # two sites: adding the clean errors is not re-encoding them
    report, two = _run(tmp_path, "two", model="tiny-pythia", site="resid_post", layer="0,1", sae=template,
                       interventions=names)
    assert abs(_of(two, "error_add").kl.mean() - _of(two, "sae").kl.mean()) > 1e-5


def test_interaction_terms_sum_to_the_joint_effect(tmp_path, load_model):
    """--joint-subsets: the Möbius terms over every subset sum to the joint KL; order 1 is each site alone,
    order 2 a pair's KL less its two sites alone; each has a context-bootstrap interval around it."""
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, SUBLAYER)
    names = ["sae", "epsilon_random"]
    report, _ = _run(tmp_path, "all", model="tiny-gpt2", site="attn_out,mlp_out,resid_post", layer="1",
                     sae=template, interventions=names, joint_subsets=True)
    found = report.interactions
    hooks = [hook_name(s, v) for s, v in SUBLAYER]
    assert found.sites == hooks and [t.order for t in found.terms] == [1, 1, 1, 2, 2, 2, 3]
    alone = {site.hook_name: site.kl_mean for site in report.compounding.sites}
    pairs = {tuple(s.sites): s.compounding.additivity for s in report.compounding.subsets}
    for name in names:
        total = sum(t.terms[name].estimate for t in found.terms)
        assert total == pytest.approx(found.joint_kl_mean[name], rel=1e-12)
        assert found.joint_kl_mean[name] == pytest.approx(report.interventions[name].kl_mean, rel=1e-6)
        for term in found.terms:
            d = term.terms[name]
            assert d.ci_low <= d.estimate <= d.ci_high and d.n_contexts == 4
            if term.order == 1:
                assert d.estimate == pytest.approx(alone[term.sites[0]][name], rel=1e-6)
            if term.order == 2:
                joint = pairs[tuple(term.sites)][name].joint_kl_mean
                expected = joint - sum(alone[s][name] for s in term.sites)
                assert d.estimate == pytest.approx(expected, abs=5e-9)  # the reports' means are float32's
        assert any(abs(t.terms[name].estimate) > 1e-6 for t in found.terms if t.order == 2)
    out = tmp_path / "all"
    rebuild(out)
    assert (out / "interactions.png").is_file() and "## Interactions" in (out / "report.md").read_text()
    assert load_report(out).interactions == found
    # a subset's own report: a pair has its two sites and itself, so its terms too
    pair = load_report(out / report.compounding.subsets[0].path).interactions
    assert [t.order for t in pair.terms] == [1, 1, 2]
    assert pair.terms[2].terms["sae"].estimate == pytest.approx(
        found.terms[3].terms["sae"].estimate, rel=1e-9)


def test_interactions_need_every_subset(tmp_path, load_model):
    """Two sites: the joint run is the one pair, so it has its terms; four without --joint-subsets: none."""
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [(site, v) for site in ("resid_pre", "resid_post") for v in (0, 1)])
    report, _ = _run(tmp_path, "two", model="tiny-gpt2", site="resid_pre", layer="0,1", sae=template,
                     interventions=["sae"])
    assert [t.order for t in report.interactions.terms] == [1, 1, 2]
    assert sum(t.terms["sae"].estimate for t in report.interactions.terms) == pytest.approx(
        report.interventions["sae"].kl_mean, rel=1e-6)
    report, _ = _run(tmp_path, "four", model="tiny-gpt2", site="resid_pre,resid_post", layer="0,1", sae=template,
                     interventions=["sae"])
    assert report.interactions is None and not (tmp_path / "four" / "interactions.png").exists()


@pytest.mark.parametrize("mode", [{"mode": "single_token", "position": 5, "k": 2},
                                  {"mode": "many_samples", "position": 5, "n_samples": 4}])
def test_matched_baselines_at_one_position(tmp_path, load_model, mode):
    """Single-token and many-samples runs patch position t at every site: the baseline's ε there is the joint SAE
    run's, on each of the measured rows of that context."""
    lm = load_model("tiny-gpt2")
    template = _saes(tmp_path, lm, [("resid_pre", 0), ("resid_pre", 1)])
    report, tokens = _run(tmp_path, "run", model="tiny-gpt2", site="resid_pre", layer="0,1", sae=template,
                          interventions=["sae", "epsilon_random"], **mode)
    sae, noise = _of(tokens, "sae"), _of(tokens, "epsilon_random")
    assert len(sae) == 4 * (mode.get("k", 0) + 1)
    for k in range(2):
        np.testing.assert_allclose(noise[f"site{k}_eps"], sae[f"site{k}_eps"], rtol=2e-5)
        assert (sae.groupby("context")[f"site{k}_eps"].nunique() == 1).all()  # t's size on every row of a context
    np.testing.assert_allclose(sae.site0_eps, sae.eps, rtol=1e-5)  # the lowest site: the clean ε at t
    assert report.compounding.patch_sizes[1].eps_mean["epsilon_random"] == pytest.approx(
        report.compounding.patch_sizes[1].eps_mean["sae"], rel=1e-5)
