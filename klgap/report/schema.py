"""The report.json schema's core, defined once (pydantic), validated on write and on read.

A report's sections (the error decomposition, a joint run's compounding, a study's over-training, and any a
plugin registers) are not named here: klgap/report/sections.py adds each as a field of its own to these models
(``report_model``), and klgap/report/read.py reads and validates a report.json with them.

`schema_version` is semver: a reader accepts any report with the same major version. Bump the minor
version when adding a field, the major version when removing or changing one. The JSON Schema file
committed beside this module (`report.schema.json`) is generated from the models with their sections
(`python -m klgap.report.read > klgap/report/report.schema.json`); a test checks it is current.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "0.6.0"
#: the random baseline every summary compares the SAE against (the ratio, the gap, the summary tables)
BASELINE = "epsilon_random"

Num = float | None  # NaN and infinities are written as null


class StrictModel(BaseModel):
    """A report model: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class InterventionStats(StrictModel):
    """Per-token KL and ΔCE of one intervention, over finite values; n_nonfinite are left out and counted."""

    kl_mean: Num
    kl_median: Num
    kl_p999: Num
    ce_delta_mean: Num
    ce_delta_median: Num
    ce_delta_p999: Num
    n_tokens: int
    n_nonfinite: int


class RatioCI(StrictModel):
    """mean(sae)/mean(baseline) with a bootstrap interval that resamples whole contexts."""

    ratio: Num
    ci_low: Num
    ci_high: Num
    n_contexts: int
    n_boot: int | None = None


class PairedTest(StrictModel):
    """Wilcoxon signed-rank on per-context means (sae vs baseline); effect size is rank-biserial.

    p_holm is Holm-corrected within `holm_family` (klgap.report.holm: the SAE against one named baseline across a
    study's sites/layers, or all cosine_matched curve points), a family of `holm_family_size` tests; reports
    written before 0.3.0 have no family (their p_holm corrected every test of the report together)."""

    statistic: Num
    p_value: Num
    effect_size: Num
    n_contexts: int
    p_holm: Num = None
    holm_family: str | None = None
    holm_family_size: int | None = None


class MeanCI(StrictModel):
    """A mean over tokens (or a difference of two, paired on contexts) with a bootstrap interval that resamples
    whole contexts."""

    mean: Num
    ci_low: Num
    ci_high: Num
    n_contexts: int
    n_boot: int | None = None


class Comparison(StrictModel):
    """The SAE against one baseline. ce_delta_difference is mean ΔCE(sae) − mean ΔCE(baseline), its interval
    resampling the same contexts for both; ce_delta_baseline is the baseline's mean ΔCE (the ratio's denominator)
    with its interval: ce_delta_ratio means something only where that interval excludes 0."""

    kl_ratio: RatioCI
    ce_delta_ratio: RatioCI
    wilcoxon_kl: PairedTest
    ce_delta_difference: MeanCI | None = None
    ce_delta_baseline: MeanCI | None = None


class SaeLensScores(StrictModel):
    """sae_lens's normalised scores (sae_lens.evals.get_downstream_reconstruction_metrics), from this run's own
    means over its measured tokens, with zero ablation as the reference:
    kl_div_score = (KL_zero − KL_sae) / KL_zero, ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    = (ΔCE_zero − ΔCE_sae) / ΔCE_zero. 1 is a perfect reconstruction, 0 no better than zero ablation.

    Computed as sae_lens computes them: `zero` replaces every position (BOS and masked tokens too), the SAE only
    the tokens --mask-special keeps, both measured on those tokens (ratios of means over them). Each score has a
    bootstrap interval over contexts (1 − the interval of the sae/zero ratio of means, schema 0.6.0);
    ce_loss_score is None, with `ce_loss_score_withheld` saying why, when the interval of CE_zero − CE_clean
    (zero's mean ΔCE) contains 0: a score over a denominator that may be 0 says nothing."""

    kl_div_score: Num
    ce_loss_score: Num | None
    kl_div_score_ci: tuple[Num, Num] | None = None
    ce_loss_score_ci: tuple[Num, Num] | None = None
    ce_loss_score_withheld: str | None = None
    n_contexts: int | None = None


class SAEInfo(StrictModel):
    source: str
    hook_name: str | None
    architecture: str
    d_in: int
    d_sae: int
    info: dict[str, Any] = Field(default_factory=dict)


class QualityNote(StrictModel):
    """A note on what a verdict is about when the SAE is not a working one (klgap/report/quality.py): its kind and
    the sentence the opening block, stderr and the pages give (schema 0.6.0)."""

    kind: Literal["no_active_features", "explained_variance_not_positive", "dense_codes", "few_training_tokens"]
    text: str


class SAEMetrics(StrictModel):
    explained_variance: Num
    l0_mean: Num
    cos_mean: Num
    eps_mean: Num
    x_norm_mean: Num
    x_hat_norm_mean: Num
    n_nonfinite_activations: int


class ModuleRef(StrictModel):
    path: str
    io: Literal["input", "output"]
    index: int | None


class PluginRef(StrictModel):
    plugin: str
    version: str | None


class Provenance(StrictModel):
    klgap_version: str
    git_hash: str | None
    packages: dict[str, str | None]
    python: str
    platform: str
    created_at: str


class SingleToken(StrictModel):
    position: int
    k: int
    kl_by_offset: dict[str, dict[str, Num]]


class ManySamplesContext(StrictModel):
    context: int
    sae_kl: Num
    z: Num
    percentile: Num
    draw_mean: Num
    draw_std: Num


class ManySamples(StrictModel):
    sample_intervention: str
    n_draws: int
    z_mean: Num
    z_median: Num
    frac_z_above_2: Num
    percentile_mean: Num
    per_context: list[ManySamplesContext]


class Correlation(StrictModel):
    rho: Num
    p_value: Num
    n: int


class TopToken(StrictModel):
    token_id: int
    token: str | None
    mean_gap: Num
    count: int


class GapAnalysis(StrictModel):
    """The per-token gap KL(sae) − KL(baseline): Spearman correlations and the tokens where it is largest."""

    baseline: str
    gap_mean: Num
    frac_tokens_gap_positive: Num
    spearman: dict[str, Correlation]
    top_tokens: list[TopToken]


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


class SiteSummary(StrictModel):
    """What a measurement at one site and layer found (shared by run reports and study rows)."""

    site: str
    layer: int
    hook_name: str
    sae: SAEInfo
    n_tokens: int
    n_contexts: int
    interventions: dict[str, InterventionStats]
    kl_ratio_sae_over_epsilon_random: Num
    comparisons: dict[str, Comparison]
    sae_metrics: SAEMetrics
    notes: list[str]
    curve: Curve | None = None
    sae_lens_scores: SaeLensScores | None = None  # when both sae and zero were measured
    # the measured interventions their plugins declare baselines (klgap.protocols.BaselineRole), by recorded name,
    # with how a sentence names each; absent in reports written before klgap recorded it (klgap/report/panel.py)
    baselines: dict[str, str] | None = None
    size_bins: SizeBins | None = None  # all-token runs: the ratio in bins of ε/‖x‖ (klgap/report/size_bins.py)
    sweep: Sweep | None = None  # runs with length sweeps (`klgap curve --along error`; klgap/report/sweep.py)
    # notes on the SAE's quality beside the verdict (klgap/report/quality.py; schema 0.6.0: empty before)
    quality_notes: list[QualityNote] = Field(default_factory=list)
    held_out: HeldOut | None = None  # measured vs training tokens (schema 0.6.0; None: written before)


class JointSite(StrictModel):
    """One (site, layer) of a joint run, with its SAE; ``path``: the folder where it was measured alone."""

    site: str
    layer: int
    hook_name: str
    sae: SAEInfo
    path: str


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


class RunFacts(StrictModel):
    """How a run measured (shared by run.json's RunRecord and report.json's Report): model, module patched,
    mode, execution path, configuration, plugins and provenance."""

    model: str
    module: ModuleRef
    mode: Literal["all_tokens", "single_token", "many_samples"]
    context_len: int
    first_position: str
    masked_tokens: str | None = None  # --mask-special: what was left unpatched and unmeasured (klgap/job/masks.py)
    last_position: str = "measured"  # "patched, not measured" with drop_last_position (the study's protocol)
    centered_activations: bool
    execution: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any]
    seed: int
    device: str
    world_size: int = 1  # ranks that shared the batches (last command; a merge: its shards' most); numbers do not depend on it
    dtype: str
    dataset: str
    plugins: dict[str, PluginRef]
    provenance: Provenance
    joint: list[JointSite] | None = None  # a joint run's sites (site/layer/sae above: the lowest one's)
    precision: PrecisionCheck | None = None  # a low-precision run's check against float32 (schema 0.5.0)


class Report(RunFacts, SiteSummary):
    """One measurement: a model, a site and layer, an SAE, a mode, its interventions."""

    schema_version: str
    kind: Literal["run"] = "run"
    gap: GapAnalysis | None = None
    single_token: SingleToken | None = None
    many_samples: ManySamples | None = None

    @property
    def position(self) -> int | None:
        """The one patched position t of a single_token / many_samples run (from its config); None in all_tokens."""
        if self.single_token is not None:
            return self.single_token.position
        return self.config.get("position") if self.mode != "all_tokens" else None


class StudyRun(SiteSummary):
    """One (site, layer) of a study: the summary of its run report, which lives at `path`."""

    path: str


class RunPairCorrelation(StrictModel):
    a: str
    b: str
    rho: Num
    p_value: Num
    n: int


class StudyReport(StrictModel):
    """Several sites/layers from one command; p_holm is corrected within each Holm family across the study
    (klgap.report.holm)."""

    schema_version: str
    kind: Literal["study"]
    model: str
    mode: Literal["all_tokens", "single_token", "many_samples"]
    runs: list[StudyRun]
    gap_correlation_between_runs: list[RunPairCorrelation]
    config: dict[str, Any]
    provenance: Provenance


def as_json(model: BaseModel) -> dict[str, Any]:
    """The JSON object of a report (or a part of one): the fields it was built or read with, none added;
    NaN and infinities as null."""
    return json.loads(model.model_dump_json(exclude_unset=True))


def major_version(version: str) -> str:
    return str(version).split(".")[0]
