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

from pydantic import BaseModel, Field

from klgap.report.statistics_schema import (  # noqa: F401  (re-exported: the schema is read from here)
    Num, StrictModel, InterventionStats, RatioCI, PairedTest, MeanCI, Comparison, SaeLensScores, SAEInfo,
    QualityNote, SAEMetrics, ModuleRef, PluginRef, Provenance, SingleToken, ManySamplesContext, ManySamples,
    Correlation, TopToken, GapAnalysis,
)
from klgap.report.measures_schema import (  # noqa: F401
    CurvePoint, CurveSAE, Curve, SizeBin, SizeBins, SweepPoint, Plateau, SweepDirection, Sweep, HeldOut,
    PrecisionIntervention, PrecisionCheck,
)

SCHEMA_VERSION = "0.7.0"
#: the random baseline every summary compares the SAE against (the ratio, the gap, the summary tables)
BASELINE = "epsilon_random"


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
    # what each measured intervention's x' is, by recorded name (klgap.protocols.DescribedPerturbation; schema 0.7.0)
    definitions: dict[str, str] = Field(default_factory=dict)
    size_bins: SizeBins | None = None  # all-token runs: the ratio in bins of ε/‖x‖ (klgap/report/size_bins.py)
    sweep: Sweep | None = None  # runs with length sweeps (`klgap curve --along error`; klgap/report/sweep.py)
    # notes on the SAE's quality beside the verdict (klgap/report/quality.py; schema 0.6.0: empty before)
    quality_notes: list[QualityNote] = Field(default_factory=list)
    held_out: HeldOut | None = None  # measured vs training tokens (schema 0.6.0; None: written before)
    # the clean run's cross-entropy of the next token, nats per measured token, with its bootstrap interval over
    # contexts (the parts' ce_clean column, klgap/job/modes.py); None in runs whose parts predate it
    ce_clean: MeanCI | None = None


class JointSite(StrictModel):
    """One (site, layer) of a joint run, with its SAE; ``path``: the folder where it was measured alone."""

    site: str
    layer: int
    hook_name: str
    sae: SAEInfo
    path: str


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
