"""The report schema's measurement sections (klgap/report/schema.py re-exports them): robustness curves, ratios
in bins of the error's size, length sweeps, held-out tokens and a low-precision run's check against float32."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from klgap.report.statistics_schema import MeanCI, Num, RatioCI, StrictModel


class CurvePoint(StrictModel):
    """Mean KL of cosine_matched noise at one (cos, norm_frac), with a context-bootstrap interval."""

    intervention: str
    cos: float
    norm_frac: float
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num
    n_tokens: int


class CurveSAE(StrictModel):
    """The SAE's own point: its mean cos(x, x̂), mean ‖x̂‖/‖x‖ and mean KL."""

    cos_mean: Num
    norm_frac_mean: Num
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num


class Curve(StrictModel):
    """A robustness curve; sae_equivalent_cos[norm_frac] = the cosine where the noise's KL equals the SAE's."""

    points: list[CurvePoint]
    sae: CurveSAE | None
    sae_equivalent_cos: dict[str, Num]


class SizeBin(StrictModel):
    """The tokens whose SAE error ε = ‖x − x̂‖ is between low·‖x‖ and high·‖x‖ (high None: open): the SAE's mean KL
    there and, per baseline, KL(sae)/KL(baseline) over those tokens with a context-bootstrap interval."""

    low: float
    high: float | None
    n_tokens: int
    n_contexts: int
    kl_sae: Num
    ratios: dict[str, RatioCI]


class SizeBins(StrictModel):
    """The ratio at matched error size (klgap/report/size_bins.py): tokens binned by the SAE's ε/‖x‖ (fixed edges),
    so SAEs of different fidelity compare at the same relative error."""

    baselines: list[str]
    bins: list[SizeBin]


class SweepPoint(StrictModel):
    """Mean KL of x + t·(a direction of length ε) at one length t, with a context-bootstrap interval."""

    intervention: str
    t: float
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num
    n_tokens: int


class Plateau(StrictModel):
    """The plateau width along one direction: the length t at which the mean KL first reaches the sweep's threshold
    (linear between grid points), with its 95% context-bootstrap interval. censored: the curve stayed below the
    threshold on the whole grid, so t is the grid's end, a lower bound (or the grid's first point was already above
    it, then t is that point, an upper bound)."""

    t: Num
    ci_low: Num
    ci_high: Num
    censored: bool


class SweepDirection(StrictModel):
    """KL against length along one direction: ``error`` (x + t·(x̂ − x): t = 1 is the SAE) or a baseline's
    (x + t·ε·u, u its unit direction at the token)."""

    direction: str
    points: list[SweepPoint]
    plateau: Plateau | None
    sae_equivalent_t: Num  # the length at which this direction's KL equals the SAE's (t = 1 along the error)


class Sweep(StrictModel):
    """Length sweeps (Lee & Heimersheim 2024's error extrapolation; klgap/report/sweep.py): the plateau threshold is
    threshold_frac × the SAE's mean KL (threshold_kl)."""

    threshold_frac: float
    threshold_kl: Num
    sae_kl: Num
    directions: list[SweepDirection]


class HeldOut(StrictModel):
    """Whether a run's measured tokens are apart from its SAE's training tokens (schema 0.6.0; klgap/job/disjoint.py).

    dataset: the measured source as resolved, with its split (``sample:eval``); split: the split measured (None: the
    source has no splits, it is read whole); chosen: klgap chose the split (``--dataset`` named none); trained_on:
    the SAE's training tokens as its training.json records them (None: not recorded, e.g. a pretrained SAE);
    status: ``disjoint`` (same source, another split), ``overlap`` (same source and split, or one read whole) or
    ``unknown``; why: one line saying so, when it is worth a note (an overlap, a source without splits, a
    training.json that does not record its tokens)."""

    dataset: str
    split: str | None
    chosen: bool
    trained_on: str | None
    status: Literal["disjoint", "overlap", "unknown"]
    why: str | None = None


class PrecisionIntervention(StrictModel):
    """One intervention in the precision check: mean KL in each precision and the per-token |ΔKL| between them
    (rel_*: divided by the float32 mean KL)."""

    kl_mean_float32: Num
    kl_mean: Num
    mean_rel_change: Num  # |kl_mean / kl_mean_float32 − 1|
    abs_diff_max: Num
    abs_diff_p99: Num
    rel_diff_max: Num
    rel_diff_p99: Num


class PrecisionCheck(StrictModel):
    """A low-precision run (``--dtype bfloat16|float16|auto``) against float32 on its first contexts, with the same
    tokens and draws (klgap/job/precision.py): the model computes in `dtype` in one and in float32 in the other;
    the patch (x, x̂, baselines) and the KL / ΔCE are float32 in both. ``passed`` when every intervention's mean KL
    and the headline ratio moved by at most `tolerance` (relative); `measured_dtype` is what the run then used
    (``--dtype auto`` falls back to float32 when the check fails)."""

    dtype: str
    measured_dtype: str
    n_contexts: int
    n_tokens: int  # per-token rows compared, all interventions together
    kl_abs_diff_max: Num
    kl_abs_diff_p99: Num
    kl_rel_diff_max: Num  # the largest rel_diff_max of the interventions
    kl_rel_diff_p99: Num
    kl_mean_rel_change_max: Num
    ratio_float32: Num  # KL(sae) / KL(epsilon_random) on the check's contexts (None without both)
    ratio: Num
    ratio_rel_change: Num
    tolerance: float
    passed: bool
    interventions: dict[str, PrecisionIntervention]


__all__ = ['CurvePoint', 'CurveSAE', 'Curve', 'SizeBin', 'SizeBins', 'SweepPoint', 'Plateau', 'SweepDirection', 'Sweep', 'HeldOut', 'PrecisionIntervention', 'PrecisionCheck']
