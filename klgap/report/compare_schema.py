"""The schema of compare.json (`klgap compare`): pydantic models, and the JSON schema generated from them.

The committed ``compare.schema.json`` beside this module is generated from these models
(``python -m klgap.report.compare_schema > klgap/report/compare.schema.json``); a test checks it is current. A row holds the
columns of compare.csv (klgap/report/compare.py: ``COLUMNS``) and the run's robustness curve, when it has one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from klgap.errors import KlgapError
from klgap.report.between_saes import BetweenSaes
from klgap.report.schema import SCHEMA_VERSION, Curve, Num, Provenance, StrictModel, major_version


class CompareRun(StrictModel):
    """One compared site/layer: its summary row (as its own report.json gives it) and its curve."""

    label: str
    model: str
    site: str
    layer: int
    mode: Literal["all_tokens", "single_token", "many_samples"]
    n_tokens: int
    kl_sae: Num
    kl_epsilon_random: Num
    ratio: Num
    ratio_ci_low: Num
    ratio_ci_high: Num
    p_holm: Num
    sae_cos: Num
    sae_equivalent_cos: Num
    path: str
    p_value: Num
    holm_family: str | None
    explained_variance: Num = None  # the SAE's, on the run's tokens (schema 0.6.0; klgap/report/quality.py)
    l0_mean: Num = None
    kl_div_score: Num = None  # where the run measured zero ablation
    ce_loss_score: Num = None  # where the run measured zero ablation (None too where withheld)
    ce_clean: Num = None  # the run's mean clean CE, nats per token (None where its parts predate it)
    quality_notes: list[str] = Field(default_factory=list)
    curve: Curve | None


class CompareBetweenSaes(BetweenSaes):
    """A compared study's SAEs of one site that differ in seed or architecture only (klgap/report/between_saes.py),
    labelled as its folder's runs are."""

    label: str


class CompareFile(StrictModel):
    """compare.json: every compared site/layer, in the order of the command's RUN_DIRs; the compared studies'
    between-SAE groups."""

    schema_version: str
    kind: Literal["compare"] = "compare"
    runs: list[CompareRun]
    between_saes: list[CompareBetweenSaes] = Field(default_factory=list)
    provenance: Provenance


def validate_compare(data: Any, source: str = "compare.json") -> CompareFile:
    """Check a compare.json's parsed JSON against :class:`CompareFile`; KlgapError naming the first problems."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version is None or major_version(version) != major_version(SCHEMA_VERSION):
        raise KlgapError(f"{source} has schema_version {version}; this klgap reads {major_version(SCHEMA_VERSION)}.x "
                         f"(it writes {SCHEMA_VERSION})")
    try:
        return CompareFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
                             for err in exc.errors()[:5])
        raise KlgapError(f"{source} does not match the compare schema {SCHEMA_VERSION}: {problems}") from exc


def json_schema() -> dict[str, Any]:
    schema = CompareFile.model_json_schema()
    schema["$id"] = f"https://klgap.invalid/compare.schema.json#{SCHEMA_VERSION}"
    schema["title"] = f"klgap compare {SCHEMA_VERSION}"
    return schema


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
