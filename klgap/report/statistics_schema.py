"""The report schema's building blocks (klgap/report/schema.py re-exports them): the strict base model, the
statistics of an intervention and a comparison, the SAE's metrics and scores, provenance, and the single-token,
many-samples and per-token-gap sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    ce_loss_with_sae: Num = Field(default=None, description=(
        "CE_sae: the mean next-token cross-entropy with the SAE's reconstruction patched in, nats per measured token "
        "(the run's mean clean CE plus the SAE's mean ΔCE; sae_lens's ce_loss_with_sae); None in runs whose parts "
        "predate the clean CE"))
    ce_loss_with_ablation: Num = Field(default=None, description=(
        "CE_zero: the same with zero ablation (the clean CE plus zero's mean ΔCE; sae_lens's "
        "ce_loss_with_ablation); ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)"))


class SAEInfo(StrictModel):
    source: str
    hook_name: str | None
    architecture: str
    d_in: int
    d_sae: int
    info: dict[str, Any] = Field(default_factory=dict)
    reads: str | None = Field(None, description=(
        "a transcoder's: the hook of the site it reads (blocks.L.ln2.hook_normalized, the MLP's input) while it "
        "writes hook_name; null for an SAE, which reads and writes one site"))
    d_out: int | None = Field(None, description="a transcoder's output width (null: d_in)")
    skip: bool = Field(False, description="a skip transcoder: its output includes a skip term x_in·W_skipᵀ")


class QualityNote(StrictModel):
    """A note on what a verdict is about when the SAE is not a working one (klgap/report/quality.py): its kind and
    the sentence the opening block, stderr and the pages give (schema 0.6.0)."""

    kind: Literal["no_active_features", "explained_variance_not_positive", "dense_codes", "few_training_tokens"]
    text: str


class SAEMetrics(StrictModel):
    """The SAE's reconstruction on the run's measured tokens (x centred like the SAE's input, x̂ its reconstruction).

    Three definitions of how much of x the SAE explains are in use; klgap reports each as its source computes it."""

    explained_variance: Num = Field(description=(
        "1 − Σᵢ‖xᵢ − x̂ᵢ‖² / Σᵢ‖xᵢ − x̄‖², x̄ the mean over the run's tokens: sae_lens's current explained variance "
        "(sae_lens.evals.ExplainedVarianceCalculator: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), since SAELens #659/#665)"))
    explained_variance_legacy: Num = Field(default=None, description=(
        "mean over tokens of 1 − ‖xᵢ − x̂ᵢ‖² / ‖xᵢ − x̄_B‖², x̄_B the mean of the token's batch: sae_lens's "
        "explained_variance_legacy (sae_lens.evals.get_sparsity_and_variance_metrics; its per-batch formula before "
        "SAELens #659/#665, see #443); depends on --batch-size as sae_lens's on eval_batch_size_prompts. "
        "Schema 0.7.0; None in reports whose parts predate it"))
    fvu: Num = Field(default=None, description=(
        "Σᵢ‖xᵢ − x̂ᵢ‖² / Σᵢ‖xᵢ − x̄‖²: sparsify's fraction of variance unexplained (sparsify.SparseCoder.forward: "
        "e.pow(2).sum() / (y − y.mean(0)).pow(2).sum(), per training batch there), pooled over the run's tokens "
        "here, so fvu = 1 − explained_variance. Schema 0.7.0"))
    # anisotropy (klgap/report/anisotropy.py): None in reports whose parts predate it, and the principal-component
    # numbers None where no batch holds PCA_MIN_ROWS (256) measured rows (single-token, many-samples runs)
    mean_offset_share: Num = Field(default=None, description=(
        "‖x̄‖² / mean ‖x‖² over the run's measured tokens: how much of the activations' squared norm is their mean"))
    top_pc_share: Num = Field(default=None, description=(
        "the first principal component's share of the variance around each batch's mean, pooled over batches"))
    explained_variance_top_pc_removed: Num = Field(default=None, description=(
        "1 − Σ‖P⊥e‖² / Σ‖P⊥(x − x̄_B)‖² with P⊥ the projection off each batch's first principal component "
        "(x̄_B the batch's mean): the explained variance in the other directions"))
    explained_variance_top_pcs_removed: Num = Field(default=None, description=(
        "as explained_variance_top_pc_removed, with each batch's top k principal components removed, k the fewest "
        "that explain half its variance (top_pcs_removed_min/max)"))
    top_pcs_removed_min: int | None = None  # the smallest and largest k over the batches
    top_pcs_removed_max: int | None = None
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


__all__ = ['Num', 'StrictModel', 'InterventionStats', 'RatioCI', 'PairedTest', 'MeanCI', 'Comparison', 'SaeLensScores', 'SAEInfo', 'QualityNote', 'SAEMetrics', 'ModuleRef', 'PluginRef', 'Provenance', 'SingleToken', 'ManySamplesContext', 'ManySamples', 'Correlation', 'TopToken', 'GapAnalysis']
