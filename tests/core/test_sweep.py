"""Length sweeps: the ``along`` perturbation's geometry (klgap_perturbations.sweep) and the report's sweep section
(klgap/report/sweep.py): plateau widths on constructed curves, their bootstrap intervals, the grid and flag checks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.errors import KlgapError
from klgap.plan.resolve import build_intervention
from klgap.report import stats
from klgap.report.schema import InterventionStats
from klgap.report.sweep import (build_sweep, parse_baselines, parse_point, parse_scale_grid, plateau_width,
                                sweep_interventions, sweep_specs)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def acts():
    g = gen(1)
    x = torch.randn(256, 24, generator=g) * torch.linspace(0.2, 3.0, 24)
    x_hat = 0.7 * x + 0.4 * torch.randn(x.shape, generator=g)
    x_hat[0] = x[0]  # ε = 0: x' = x at every t
    return x, x_hat


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 1.7, 4.0])
def test_along_error_has_length_t_eps_and_t1_is_the_sae(acts, t):
    x, x_hat = acts
    p = build_intervention(f"along:dir=error,t={t:g}").perturbation
    out = p(x, x_hat, gen())
    eps = (x - x_hat).double().norm(dim=-1)
    torch.testing.assert_close((out - x).double().norm(dim=-1), t * eps, rtol=2e-6, atol=2e-6)
    if t == 1.0:
        assert torch.equal(out, build_intervention("sae").perturbation(x, x_hat, gen()))  # bit for bit
    if t == 0.0:
        assert torch.equal(out, x)
    direction = (out - x).double()[1:]
    cos = torch.nn.functional.cosine_similarity(direction, (x_hat - x).double()[1:], dim=-1)
    if t > 0:
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-6)  # along x̂ − x


@pytest.mark.parametrize("direction", ["epsilon_random", "cov_random_mixture", "real_direction", "sae_error_shuffled",
                                       "pca_matched", "epsilon_mahalanobis"])
def test_along_a_baseline_steps_t_eps_along_its_unit_direction(acts, direction):
    x, x_hat = acts
    eps = (x - x_hat).double().norm(dim=-1)
    for t in (0.5, 2.0):
        p = build_intervention(f"along:dir={direction},t={t:g}").perturbation
        if hasattr(p, "fit"):
            p.fit(x)
        if hasattr(p, "fit_error"):
            p.fit_error(x, x_hat)
        out = p(x, x_hat, gen(3))
        step = (out - x).double()
        torch.testing.assert_close(step.norm(dim=-1), t * eps, rtol=2e-6, atol=2e-6)  # length t·ε, exactly
        unit = step[1:] / (t * eps[1:, None])
        torch.testing.assert_close(unit.norm(dim=-1), torch.ones(len(unit), dtype=torch.float64), rtol=2e-6, atol=0)
        assert torch.equal(out[0], x[0])  # ε = 0


def test_along_a_baseline_at_t1_is_that_baseline(acts):
    """The direction is the baseline's own draw: with the same generator, t = 1 gives the baseline's x'."""
    x, x_hat = acts
    for name in ("epsilon_random", "sae_error_shuffled"):
        base = build_intervention(name).perturbation(x, x_hat, gen(5))
        along = build_intervention(f"along:dir={name},t=1").perturbation(x, x_hat, gen(5))
        torch.testing.assert_close(along, base, rtol=1e-5, atol=1e-5)


def test_the_lengths_of_one_direction_share_one_fit(acts):
    x, _ = acts
    a = build_intervention("along:dir=real_direction,t=0.5").perturbation
    b = build_intervention("along:dir=real_direction,t=1.5").perturbation
    a.fit(x)
    b.fit(x.clone())  # equal activations: the fitted bank is shared, not held twice
    assert a.inner is b.inner
    c = build_intervention("along:dir=real_direction,t=2").perturbation
    c.fit(x[:128])  # another run's activations: its own fit
    assert c.inner is not a.inner and c.inner.state.rows.shape[0] == 128
    assert a.fit_summary()["bank_rows"] == 256


@pytest.mark.parametrize(("spec", "message"), [
    ("along:dir=along", "dir='along' is not valid"),
    ("along:dir=cosine_matched:cos=0.5", "is not valid"),
    ("along:t=-1", "t='-1' is not valid"),
    ("along:dir=no_such_noise", "no_such_noise"),
    ("along:scale=2", "has no parameter 'scale'"),
])
def test_bad_parameters_are_one_line_errors(spec, message):
    with pytest.raises(KlgapError, match=message):
        build_intervention(spec)


# --------------------------------------------------------------------------- grids and specs


def test_scale_grid_and_interventions():
    assert parse_scale_grid("0:2:21") == pytest.approx([i / 10 for i in range(21)])
    assert parse_scale_grid("1,0.5,0") == [0.0, 0.5, 1.0]
    for text, message in [("-1:1:3", "-1 is not a length"), ("0:1:1", "count must be ≥ 2"), ("x", "START:STOP:COUNT")]:
        with pytest.raises(KlgapError, match=message):
            parse_scale_grid(text)
    assert sweep_interventions([0.0, 1.0], ["epsilon_random"]) == [
        "sae", "epsilon_random", "along:dir=error,t=0", "along:dir=error,t=1", "along:dir=epsilon_random,t=0",
        "along:dir=epsilon_random,t=1"]
    assert len(sweep_specs()) == 1 + 3 + 4 * 21
    with pytest.raises(KlgapError, match="--along 'x' is not valid; valid: error"):
        sweep_specs("x")
    with pytest.raises(KlgapError, match="'cov_random_mixture:origin=x' is not valid"):
        parse_baselines("epsilon_random,cov_random_mixture:origin=x")
    assert parse_point("along(dir=real_direction,t=1.5)") == ("real_direction", 1.5)
    assert parse_point("cosine_matched(cos=0.5,norm_frac=1)") is None


# --------------------------------------------------------------------------- plateau widths


def test_plateau_width_on_a_constructed_curve():
    t = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
    kl = np.array([0.0, 0.001, 0.004, 0.02, 0.05])
    # first at or above 0.01 at t = 1.5; between (1, 0.004) and (1.5, 0.02) in log KL
    expected = 1.0 + 0.5 * (math.log(0.01) - math.log(0.004)) / (math.log(0.02) - math.log(0.004))
    assert plateau_width(t, kl, 0.01) == (pytest.approx(expected), False)
    assert plateau_width(t, kl, 0.0005) == (pytest.approx(0.25), False)  # from KL = 0: linear
    assert plateau_width(t, kl, 0.004) == (1.0, False)  # reached on a grid point
    assert plateau_width(t, kl, 0.5) == (2.0, True)  # never reached: the grid's end, censored
    assert plateau_width(t[1:], kl[1:], 0.0001) == (0.5, True)  # already above at the first point
    assert plateau_width(t[::-1], kl[::-1], 0.01)[0] == pytest.approx(expected)  # the order of the points
    assert plateau_width(t, kl, math.nan) is None


def _frames(means_by_name, n_contexts=30, seed=0):
    """Per-context sums whose means over tokens are about the given ones (10 tokens a context, noise between them)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, mean in means_by_name.items():
        per = mean * rng.lognormal(0, 0.2, n_contexts)
        out[name] = pd.DataFrame({"sum": per * 10, "n": np.full(n_contexts, 10)},
                                 index=pd.Index(np.arange(n_contexts), name="context"))
    return out


def test_sweep_section_from_per_context_sums():
    curves = {"error": [0.0, 0.002, 0.01], "epsilon_random": [0.0, 0.0005, 0.004]}
    names = ["sae", "epsilon_random"] + [f"along(dir={d},t={t:g})" for d in curves for t in (0, 1, 2)]
    means = {"sae": 0.002, "epsilon_random": 0.0005}
    means.update({f"along(dir={d},t={t:g})": kl for d, kls in curves.items() for t, kl in zip((0, 1, 2), kls)})
    frames = _frames(means)
    frames["along(dir=error,t=1)"] = frames["sae"]  # x + 1·(x̂ − x) is x̂: the same per-token KL
    interventions = {name: InterventionStats(kl_mean=None, kl_median=None, kl_p999=None, ce_delta_mean=0.1,
                                             ce_delta_median=None, ce_delta_p999=None, n_tokens=300, n_nonfinite=0)
                     for name in names}
    sweep = build_sweep(names, frames.__getitem__, interventions, seed=4)
    sae = stats.mean_ci(frames["sae"], seed=4)
    assert sweep.sae_kl == pytest.approx(sae["mean"])
    assert sweep.threshold_frac == 0.1 and sweep.threshold_kl == pytest.approx(0.1 * sae["mean"])
    assert [d.direction for d in sweep.directions] == ["error", "epsilon_random"]
    for direction in sweep.directions:
        kl = [stats.mean_ci(frames[p.intervention], seed=4)["mean"] for p in direction.points]
        assert [p.kl_mean for p in direction.points] == pytest.approx(kl)
        assert [p.t for p in direction.points] == [0.0, 1.0, 2.0]
        width, censored = plateau_width(np.array([0.0, 1.0, 2.0]), np.array(kl), sweep.threshold_kl)
        plateau = direction.plateau
        assert plateau.t == pytest.approx(width) and plateau.censored is censored
        assert plateau.ci_low <= plateau.t <= plateau.ci_high
    error = sweep.directions[0]
    assert error.sae_equivalent_t == pytest.approx(1.0)  # the SAE's KL is the error's at t = 1 (same frame)
    assert 1.0 < sweep.directions[1].sae_equivalent_t < 2.0  # the baseline does the SAE's damage between 1 and 2
    assert build_sweep(["sae", "epsilon_random"], frames.__getitem__, interventions) is None
