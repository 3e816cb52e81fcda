"""What every figure must read as (issue 16): colours for ordered and unordered series, legends beside the data,
no one-tick layer axis, a log ratio axis centred on 1 with interval bars, titles naming model/site/layer, units."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from klgap.figures import style as figstyle

from klgap.figures import runs as plots
from klgap.figures.curves import CurvePoint, curves_of, ratio_bars, robustness_curve
from klgap.report.summary import summary_row
from tests.core.test_plots import make_report, make_study, make_tokens

COSINES = [f"cosine_matched(cos={c:g},norm_frac=0.9)" for c in np.linspace(0.5, 1.0, 11).round(2)]


def test_eleven_cosines_get_eleven_colours_in_order_and_the_rest_a_colour_blind_safe_palette():
    colors = figstyle.colors_for(["sae", "epsilon_random", *reversed(COSINES), "theta_random", "sae_norm"])
    curve = [colors[name] for name in COSINES]
    assert len(set(curve)) == 11 and curve == figstyle.sequential(11)  # along the map, ordered by cos
    assert (colors["sae"], colors["epsilon_random"]) == (figstyle.SAE, figstyle.BASELINE_COLOR)
    assert [colors["theta_random"], colors["sae_norm"]] == list(figstyle.PALETTE[:2])
    assert figstyle.series_colors(["L0", "L1", "L2"], ordered=True) == dict(zip(["L0", "L1", "L2"], figstyle.sequential(3)))


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check(fig, model: str = "fake-gpt", where: str = "resid_post L3") -> None:
    """Legends outside every axes; the title names the model and the site/layer; every labelled axis has a unit."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer)), ax
        for label in (ax.get_xlabel(), ax.get_ylabel()):
            if label:
                categorical = label == "intervention" or label == "site / layer" or label.startswith("layer of ")
                assert "[" in label or "(cosine, no unit)" in label or categorical, label
    title = fig._suptitle.get_text()
    assert model in title and where in title, title


@pytest.fixture(scope="module")
def report_and_tokens():
    tokens = make_tokens("all_tokens")
    return make_report("all_tokens", tokens), tokens


def test_run_figures_read(report_and_tokens):
    report, tokens = report_and_tokens
    _check(plots.kl_histogram(tokens, None, report))
    _check(plots.kl_by_position(tokens, None, report))
    bars = plots.kl_bars(report, None, tokens=tokens)
    _check(bars)
    ax = bars.axes[0]  # one site/layer: the interventions on the axis, no one-tick 'layer' axis, no legend
    assert ax.get_xlabel() == "intervention" and ax.get_legend() is None
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sae", "epsilon_random", "theta_random"]
    single = make_report("single_token", make_tokens("single_token"))
    _check(plots.single_token_curve(single, None))
    many_tokens = make_tokens("many_samples")
    _check(plots.many_samples_hist(many_tokens, make_report("many_samples", many_tokens), None))


def test_study_bars_name_their_layers(report_and_tokens):
    report, _ = report_and_tokens
    study = make_study([report.model_copy(update={"layer": layer}) for layer in (2, 3)])
    fig = plots.kl_bars(study, None)
    _check(fig, where="resid_post L2, resid_post L3")
    assert fig.axes[0].get_xlabel() == "layer of resid_post"


def test_robustness_bands_norm_frac_and_ordered_colours(report_and_tokens):
    report, _ = report_and_tokens
    points = {"resid_post L3": [CurvePoint(c, math.exp(-6 * c), 0.9 * math.exp(-6 * c), 1.1 * math.exp(-6 * c))
                                for c in np.linspace(0.5, 0.95, 6)]}
    fig = robustness_curve(points, None, {"resid_post L3": (0.8, 0.01)}, plots.run_label(report))
    _check(fig)
    ax = fig.axes[0]
    assert ax.collections, "no interval band drawn"
    layers = {f"L{i}": [(0.5, 0.1 / (i + 1)), (0.9, 0.01 / (i + 1))] for i in range(12)}
    fig = robustness_curve(layers, None, ordered=True)
    colors = [to_hex(line.get_color()) for line in fig.axes[0].get_lines()]
    assert colors == figstyle.sequential(12)


def test_curves_state_their_norm_fraction(report_and_tokens):
    report, _ = report_and_tokens
    from klgap.report.schema import Curve

    curve = Curve(points=[{"intervention": "cosine_matched(cos=0.5,norm_frac=0.9)", "cos": 0.5, "norm_frac": 0.9,
                           "kl_mean": 0.1, "kl_ci_low": 0.09, "kl_ci_high": 0.11, "ce_delta_mean": 0.1, "n_tokens": 9}],
                  sae=None, sae_equivalent_cos={})
    points, _ = curves_of([("L3", curve)])
    assert list(points) == ["L3 (norm 0.9·‖x‖)"] and points["L3 (norm 0.9·‖x‖)"][0].low == 0.09


def test_ratio_compare_is_log_and_centred_on_one_with_interval_bars(report_and_tokens):
    report, _ = report_and_tokens
    row = summary_row(report, report.model, report.mode)
    close = row.__class__(**{**row.__dict__, "ratio": 1.01, "ratio_ci_low": 1.004, "ratio_ci_high": 1.016})
    fig = ratio_bars([("a fake-gpt resid_post L3", row), ("b", close)], None)
    _check(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    low, high = ax.get_xlim()
    assert math.log(high) == pytest.approx(-math.log(low)) and high > row.ratio_ci_high
    assert len([c for c in ax.containers]) == 2  # an error bar per run
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert 1.0 in ticks


def test_past_eight_series_every_style_is_distinct_and_none_near_black():
    from tests.core.figure_checks import NEAR_BLACK_L, delta_e, lab

    names = ["sae", "epsilon_random", *[f"baseline_{i}" for i in range(20)], *COSINES]
    styles = figstyle.styles_for(names)
    assert len({(s.color, s.linestyle, s.marker, s.hatch) for s in styles.values()}) == len(names)
    palette = [figstyle.SAE, figstyle.BASELINE_COLOR, *figstyle.PALETTE]
    assert min(delta_e(a, b) for i, a in enumerate(palette) for b in palette[i + 1:]) >= 25
    assert all(lab(s.color)[0] >= NEAR_BLACK_L for s in styles.values())  # no series near-black
    ninth = styles["baseline_8"]  # the palette's first colour again, in the next line style, marker and hatch
    assert (ninth.color, ninth.linestyle, ninth.marker, ninth.hatch) == (figstyle.PALETTE[0], "--", "o", "//")


def test_the_figure_checks_see_what_they_are_for():
    """figure_checks refuses two series alike, a star cut at the top edge and an axis mostly empty."""
    from tests.core.figure_checks import assert_distinct_styles, assert_no_empty_range, assert_nothing_clipped

    fig = figstyle.new_figure((6, 4))
    ax = fig.subplots()
    ax.plot([0, 1], [1, 2], color="#000000", label="identity")
    ax.plot([0, 1], [2, 3], color="#111111", label="my_noise(scale=3)")
    with pytest.raises(AssertionError, match="look alike"):
        assert_distinct_styles(fig)
    fig = figstyle.new_figure((6, 4))
    ax = fig.subplots()
    ax.plot([0.5, 0.9], [0.1, 0.01], marker="o", label="curve")
    ax.plot([0.8], [0.1], marker="*", markersize=16, linestyle="none", label="SAE")
    ax.set_ylim(0.01, 0.1)  # the star's centre on the top edge: half of it cut off
    with pytest.raises(AssertionError, match="leaves the axes"):
        assert_nothing_clipped(fig)
    ax.set_yscale("log")
    ax.set_ylim(2e-5, 0.2)  # decades of nothing below the curve
    with pytest.raises(AssertionError, match="drawn from"):
        assert_no_empty_range(fig)
