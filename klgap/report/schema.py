"""The report.json schema, defined once (pydantic), validated on write and on read.

`schema_version` is semver: a reader accepts any report with the same major version. Bump the minor
version when adding a field, the major version when removing or changing one. The JSON Schema file
committed beside this module (`report.schema.json`) is generated from these models
(`python -m klgap.report.schema > klgap/report/report.schema.json`); a test checks it is current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from klgap.errors import KlgapError

SCHEMA_VERSION = "0.5.0"
#: the random baseline every summary compares the SAE against (the ratio, the gap, the summary tables)
BASELINE = "epsilon_random"

Num = float | None  # NaN and infinities are written as null


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InterventionStats(_Model):
    """Per-token KL and ΔCE of one intervention, over finite values; n_nonfinite are left out and counted."""

    kl_mean: Num
    kl_median: Num
    kl_p999: Num
    ce_delta_mean: Num
    ce_delta_median: Num
    ce_delta_p999: Num
    n_tokens: int
    n_nonfinite: int


class RatioCI(_Model):
    """mean(sae)/mean(baseline) with a bootstrap interval that resamples whole contexts."""

    ratio: Num
    ci_low: Num
    ci_high: Num
    n_contexts: int
    n_boot: int | None = None


class PairedTest(_Model):
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


class MeanCI(_Model):
    """A mean over tokens (or a difference of two, paired on contexts) with a bootstrap interval that resamples
    whole contexts."""

    mean: Num
    ci_low: Num
    ci_high: Num
    n_contexts: int
    n_boot: int | None = None


class Comparison(_Model):
    """The SAE against one baseline. ce_delta_difference is mean ΔCE(sae) − mean ΔCE(baseline), its interval
    resampling the same contexts for both; ce_delta_baseline is the baseline's mean ΔCE (the ratio's denominator)
    with its interval: ce_delta_ratio means something only where that interval excludes 0."""

    kl_ratio: RatioCI
    ce_delta_ratio: RatioCI
    wilcoxon_kl: PairedTest
    ce_delta_difference: MeanCI | None = None
    ce_delta_baseline: MeanCI | None = None


class SaeLensScores(_Model):
    """sae_lens's normalised scores (sae_lens.evals.get_downstream_reconstruction_metrics), from this run's own
    means over its measured tokens, with zero ablation as the reference:
    kl_div_score = (KL_zero − KL_sae) / KL_zero, ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)
    = (ΔCE_zero − ΔCE_sae) / ΔCE_zero. 1 is a perfect reconstruction, 0 no better than zero ablation."""

    kl_div_score: Num
    ce_loss_score: Num


class SAEInfo(_Model):
    source: str
    hook_name: str | None
    architecture: str
    d_in: int
    d_sae: int
    info: dict[str, Any] = Field(default_factory=dict)


class SAEMetrics(_Model):
    explained_variance: Num
    l0_mean: Num
    cos_mean: Num
    eps_mean: Num
    x_norm_mean: Num
    x_hat_norm_mean: Num
    n_nonfinite_activations: int


class ModuleRef(_Model):
    path: str
    io: Literal["input", "output"]
    index: int | None


class PluginRef(_Model):
    plugin: str
    version: str | None


class Provenance(_Model):
    klgap_version: str
    git_hash: str | None
    packages: dict[str, str | None]
    python: str
    platform: str
    created_at: str


class SingleToken(_Model):
    position: int
    k: int
    kl_by_offset: dict[str, dict[str, Num]]


class ManySamplesContext(_Model):
    context: int
    sae_kl: Num
    z: Num
    percentile: Num
    draw_mean: Num
    draw_std: Num


class ManySamples(_Model):
    sample_intervention: str
    n_draws: int
    z_mean: Num
    z_median: Num
    frac_z_above_2: Num
    percentile_mean: Num
    per_context: list[ManySamplesContext]


class Correlation(_Model):
    rho: Num
    p_value: Num
    n: int


class TopToken(_Model):
    token_id: int
    token: str | None
    mean_gap: Num
    count: int


class GapAnalysis(_Model):
    """The per-token gap KL(sae) − KL(baseline): Spearman correlations and the tokens where it is largest."""

    baseline: str
    gap_mean: Num
    frac_tokens_gap_positive: Num
    spearman: dict[str, Correlation]
    top_tokens: list[TopToken]


class CurvePoint(_Model):
    """Mean KL of cosine_matched noise at one (cos, norm_frac), with a context-bootstrap interval."""

    intervention: str
    cos: float
    norm_frac: float
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num
    n_tokens: int


class CurveSAE(_Model):
    """The SAE's own point: its mean cos(x, x̂), mean ‖x̂‖/‖x‖ and mean KL."""

    cos_mean: Num
    norm_frac_mean: Num
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num


class Curve(_Model):
    """A robustness curve; sae_equivalent_cos[norm_frac] = the cosine where the noise's KL equals the SAE's."""

    points: list[CurvePoint]
    sae: CurveSAE | None
    sae_equivalent_cos: dict[str, Num]


class ErrorPart(_Model):
    """One part of the SAE's error left alone (the other added back to x̂) against its random twin: a random error
    of the same per-token norm. Intervals are bootstraps over whole contexts; the test pairs per-context means."""

    intervention: str  # sae_plus_linear_error (the nonlinear part kept) or sae_plus_nonlinear_error
    twin: str  # epsilon_random_nonlinear / epsilon_random_linear
    kept: Literal["linear", "nonlinear"]  # the part of the error x' still holds
    kl: MeanCI  # mean KL of the intervention
    twin_kl: MeanCI
    kl_ratio: RatioCI  # KL(intervention) / KL(twin)
    wilcoxon_kl: PairedTest  # intervention vs twin (uncorrected p)
    excess: MeanCI  # KL(intervention) − KL(twin), paired over contexts
    excess_left: RatioCI | None  # excess / (KL(sae) − KL(epsilon_random)); None without sae and epsilon_random


class ErrorDecomposition(_Model):
    """The SAE's error e = x − x̂ split into e_lin = W x + b (ridge least squares on the fit tokens) and e_nl = e − e_lin
    (Engels et al. 2024), measured on the run's tokens (klgap/report/decomposition.py)."""

    fit_source: str  # which tokens W, b were fitted on
    held_out: bool  # fitted on tokens apart from the measured ones (--fit-tokens)
    n_fit_tokens: int | None
    r2: MeanCI  # 1 − Σ‖e_nl‖² / Σ‖e‖² over the measured tokens: the fraction of ‖e‖² the linear part explains
    r2_centred: Num  # 1 − Σ‖e_nl − ē_nl‖² / Σ‖e − ē‖²: the fraction of the error's variance explained
    lin_norm_frac: MeanCI  # mean over tokens of ‖e_lin‖ / ‖e‖ (tokens with ‖e‖ > 0)
    sae_excess: MeanCI | None  # KL(sae) − KL(epsilon_random), paired; None without both
    parts: list[ErrorPart]


class SizeBin(_Model):
    """The tokens whose SAE error ε = ‖x − x̂‖ is between low·‖x‖ and high·‖x‖ (high None: open): the SAE's mean KL
    there and, per baseline, KL(sae)/KL(baseline) over those tokens with a context-bootstrap interval."""

    low: float
    high: float | None
    n_tokens: int
    n_contexts: int
    kl_sae: Num
    ratios: dict[str, RatioCI]


class SizeBins(_Model):
    """The ratio at matched error size (klgap/report/size_bins.py): tokens binned by the SAE's ε/‖x‖ (fixed edges),
    so SAEs of different fidelity compare at the same relative error."""

    baselines: list[str]
    bins: list[SizeBin]


class SweepPoint(_Model):
    """Mean KL of x + t·(a direction of length ε) at one length t, with a context-bootstrap interval."""

    intervention: str
    t: float
    kl_mean: Num
    kl_ci_low: Num
    kl_ci_high: Num
    ce_delta_mean: Num
    n_tokens: int


class Plateau(_Model):
    """The plateau width along one direction: the length t at which the mean KL first reaches the sweep's threshold
    (linear between grid points), with its 95% context-bootstrap interval. censored: the curve stayed below the
    threshold on the whole grid, so t is the grid's end, a lower bound (or the grid's first point was already above
    it, then t is that point, an upper bound)."""

    t: Num
    ci_low: Num
    ci_high: Num
    censored: bool


class SweepDirection(_Model):
    """KL against length along one direction: ``error`` (x + t·(x̂ − x): t = 1 is the SAE) or a baseline's
    (x + t·ε·u, u its unit direction at the token)."""

    direction: str
    points: list[SweepPoint]
    plateau: Plateau | None
    sae_equivalent_t: Num  # the length at which this direction's KL equals the SAE's (t = 1 along the error)


class Sweep(_Model):
    """Length sweeps (Lee & Heimersheim 2024's error extrapolation; klgap/report/sweep.py): the plateau threshold is
    threshold_frac × the SAE's mean KL (threshold_kl)."""

    threshold_frac: float
    threshold_kl: Num
    sae_kl: Num
    directions: list[SweepDirection]


class SiteSummary(_Model):
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
    error_decomposition: ErrorDecomposition | None = None  # when the error-decomposition interventions were measured
    # the measured interventions their plugins declare baselines (klgap.protocols.BaselineRole), by recorded name,
    # with how a sentence names each; absent in reports written before klgap recorded it (klgap/report/panel.py)
    baselines: dict[str, str] | None = None
    size_bins: SizeBins | None = None  # all-token runs: the ratio in bins of ε/‖x‖ (klgap/report/size_bins.py)
    sweep: Sweep | None = None  # runs with length sweeps (`klgap curve --along error`; klgap/report/sweep.py)


class JointSite(_Model):
    """One (site, layer) of a joint run, with its SAE; ``path``: the folder where it was measured alone."""

    site: str
    layer: int
    hook_name: str
    sae: SAEInfo
    path: str


class Difference(_Model):
    """a − b with a bootstrap interval over contexts; p_value: the share of replicates with a − b ≤ 0
    (one-sided: small when a is larger)."""

    estimate: Num
    ci_low: Num
    ci_high: Num
    p_value: Num
    n_contexts: int
    n_boot: int


class CompoundingSite(_Model):
    """One site of a joint run measured alone, on the same tokens."""

    site: str
    layer: int
    hook_name: str
    path: str
    kl_mean: dict[str, Num]  # per intervention
    ce_delta_mean: dict[str, Num]
    kl_ratio: RatioCI | None  # sae / epsilon_random at this site alone


class Additivity(_Model):
    """One intervention: joint KL against the sum of its single-site KLs (per context, paired)."""

    joint_kl_mean: Num
    joint_ce_delta_mean: Num
    sum_single_kl_mean: Num
    sum_single_ce_delta_mean: Num
    joint_over_sum: RatioCI  # > 1: super-additive, < 1: sub-additive
    wilcoxon_joint_vs_sum: PairedTest
    verdict: Literal["super-additive", "sub-additive", "not distinguishable from additive"]


class Compounding(_Model):
    """A joint run's sites patched together against each alone (issue 21): does the SAE's damage compound
    more than ε-random's?"""

    sites: list[CompoundingSite]
    joint_kl_ratio: RatioCI | None  # sae / epsilon_random, every site patched
    max_single: str | None  # hook name of the site with the largest single-site ratio
    max_single_kl_ratio: Num
    joint_minus_max_single_ratio: Difference | None
    joint_ratio_larger: bool | None  # joint ratio > the largest single-site ratio (point estimates)
    additivity: dict[str, Additivity]
    subsets: list[CompoundingSubset] | None = None  # --joint-subsets: every subset of 2+ sites, by size


class CompoundingSubset(_Model):
    """A subset of a joint run's sites patched together in the same pass (``--joint-subsets``), with its own
    compounding section (against the same single-site runs)."""

    sites: list[str]  # hook names, in forward order
    path: str  # its folder, relative to the joint run's
    compounding: Compounding


Compounding.model_rebuild()


class RunFacts(_Model):
    """How a run measured (shared by run.json's RunRecord and report.json's Report): model, module patched,
    mode, execution path, configuration, plugins and provenance."""

    model: str
    module: ModuleRef
    mode: Literal["all_tokens", "single_token", "many_samples"]
    context_len: int
    first_position: str
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


class Report(RunFacts, SiteSummary):
    """One measurement: a model, a site and layer, an SAE, a mode, its interventions."""

    schema_version: str
    kind: Literal["run"] = "run"
    gap: GapAnalysis | None = None
    single_token: SingleToken | None = None
    many_samples: ManySamples | None = None
    compounding: Compounding | None = None

    @property
    def position(self) -> int | None:
        """The one patched position t of a single_token / many_samples run (from its config); None in all_tokens."""
        if self.single_token is not None:
            return self.single_token.position
        return self.config.get("position") if self.mode != "all_tokens" else None


class StudyRun(SiteSummary):
    """One (site, layer) of a study: the summary of its run report, which lives at `path`."""

    path: str


class RunPairCorrelation(_Model):
    a: str
    b: str
    rho: Num
    p_value: Num
    n: int


class TrainingPoint(_Model):
    """One checkpoint of an SAE, measured in a study over its training: where in training it was saved, how it
    reconstructs held-out activations (its training.json), and the study's KL on it. Intervals resample whole
    contexts; kl_gap is KL(sae) − KL(baseline) paired on them."""

    path: str  # the sub-run's folder, relative to the study
    checkpoint: str  # the checkpoint's SAE folder
    step: int
    tokens_seen: int
    explained_variance: Num  # held-out tokens of training
    l0_mean: Num
    kl_sae: MeanCI
    kl_baseline: MeanCI
    kl_gap: MeanCI
    kl_ratio: RatioCI


class TrainingCurve(_Model):
    """One SAE's checkpoints in training order (issue 23: does the excess KL over the baseline appear early and
    persist, or grow as training trades fidelity for sparsity?); `finding` says it in one sentence."""

    site: str
    layer: int
    hook_name: str
    baseline: str
    points: list[TrainingPoint]
    finding: str


class StudyReport(_Model):
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
    over_training: list[TrainingCurve] | None = None  # a study over SAE checkpoints (klgap/job/checkpoint_study.py)


def _major(version: str) -> str:
    return str(version).split(".")[0]


def validate_report(data: dict[str, Any], source: str = "report") -> Report | StudyReport:
    """Check a report dict against the schema; raise KlgapError naming the first problems."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version is None:
        raise KlgapError(f"{source} has no schema_version; it is not a klgap report")
    if _major(version) != _major(SCHEMA_VERSION):
        raise KlgapError(
            f"{source} has schema_version {version}, this klgap reads {_major(SCHEMA_VERSION)}.x "
            f"(it writes {SCHEMA_VERSION})"
        )
    model = StudyReport if data.get("kind") == "study" else Report
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise KlgapError(f"{source} does not match the report schema {SCHEMA_VERSION}: {problems}") from exc


def load_report(path: str | Path) -> Report | StudyReport:
    """Read a report.json (or the one in a run folder) into its typed model; KlgapError when it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise KlgapError(f"no report at {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise KlgapError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    return validate_report(data, source=str(path))


def as_json(model: BaseModel) -> dict[str, Any]:
    """The JSON object of a report (or a part of one): the fields it was built or read with, none added;
    NaN and infinities as null."""
    return json.loads(model.model_dump_json(exclude_unset=True))


def json_schema() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(Report, "validation"), (StudyReport, "validation")])
    schema = {"oneOf": [{"$ref": "#/$defs/Report"}, {"$ref": "#/$defs/StudyReport"}], **defs}
    schema["$id"] = f"https://klgap.invalid/report.schema.json#{SCHEMA_VERSION}"
    schema["title"] = f"klgap report {SCHEMA_VERSION}"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
