"""Report sections as plugins (klgap/report/sections.py): a section registered through ``register_report_sections``
is built from a run's files, typed in report.json and its schema, shown on the page and in the terminal, and
carried into a study's rows at site level; the core names none (klgap's own register the same way)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

import klgap
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.plugins.manager import get_host, reset_host
from klgap.report.read import json_schema, load_report
from klgap.report.sections import report_model, sections
from tests.helpers import random_sae, run_config


class PartCount(BaseModel):
    n_parts: int
    n_rows_sae: int


def _build(files):
    return PartCount(n_parts=len(files.paths), n_rows_sae=files.stats.interventions["sae"].n_tokens)


def _blocks(report):
    from klgap.render.blocks import Heading, Para

    found = report.part_count if not isinstance(report, klgap.StudyReport) else None
    return [Heading(2, "Part count"), Para(f"{found.n_parts} parts" if found else "across the study")]


@pytest.fixture
def plugin():
    """A third-party plugin adding a site-level section, registered for the test only."""

    @klgap.hookimpl
    def register_report_sections(register):
        register("part_count", klgap.ReportSection(PartCount, "site", _build, blocks=_blocks,
                                                   console=lambda report: ["part count section"]),
                 "how many parts a run wrote")

    reset_host()
    get_host().add_plugin(SimpleNamespace(register_report_sections=register_report_sections), "part_count_plugin")
    yield
    reset_host()


def test_klgap_registers_its_own_sections_through_the_hook():
    names = ["error_decomposition", "second_order", "compounding", "interactions", "over_training", "between_saes"]
    assert list(sections()) == names
    assert {key: s.level for key, s in sections().items()} == {
        "error_decomposition": "site", "second_order": "site", "compounding": "run", "interactions": "run",
        "over_training": "study", "between_saes": "study"}
    assert get_host().plugin_infos()[[i.name for i in get_host().plugin_infos()].index("report_sections")].registers \
        == {"report_section": names}


def test_a_plugin_section_is_built_typed_rendered_and_carried_into_a_study(plugin, tmp_path, load_model, capsys):
    lm = load_model("tiny-gpt2")
    for layer in (0, 1):
        random_sae(tmp_path / f"sae{layer}.safetensors", lm.d_model, 64, hook_name("mlp_out", layer), seed=layer)
    config = RunConfig(model="tiny-gpt2", site="mlp_out", layer="0,1", sae=str(tmp_path / "sae{layer}.safetensors"),
                       tokens=96, context_len=32, batch_size=1, dataset="random", device="cpu",
                       interventions=["sae", "epsilon_random"])
    study = run_config(config, tmp_path / "study")
    run = load_report(tmp_path / "study" / "mlp_out_L00")
    assert run.part_count == PartCount(n_parts=3, n_rows_sae=3 * 31)
    assert json.loads((tmp_path / "study" / "mlp_out_L00" / "report.json").read_text())["part_count"] == {
        "n_parts": 3, "n_rows_sae": 93}
    assert [row.part_count.n_parts for row in study.runs] == [3, 3]  # a site-level section is in each study row
    assert "part_count" in json_schema()["$defs"]["Report"]["properties"]
    assert "part_count" in report_model("study_run").model_fields
    from klgap.render.console import print_sections
    from klgap.render.pages import rebuild

    rebuild(tmp_path / "study")
    assert "## Part count\n\n3 parts" in (tmp_path / "study" / "mlp_out_L00" / "report.md").read_text()
    assert "## Part count\n\nacross the study" in (tmp_path / "study" / "report.md").read_text()
    print_sections(run)
    assert "part count section" in capsys.readouterr().out


def test_a_report_without_a_registered_section_is_refused_by_name(plugin, tmp_path):
    """A report.json holding a section no installed plugin registers does not load silently."""
    from klgap.errors import KlgapError
    from klgap.report.read import validate_report

    data = {"schema_version": "0.4.0", "kind": "study", "model": "m", "mode": "all_tokens", "runs": [],
            "gap_correlation_between_runs": [], "config": {}, "provenance": {
                "klgap_version": "0", "git_hash": None, "packages": {}, "python": "3", "platform": "x",
                "created_at": "now"}, "unknown_section": {"x": 1}}
    with pytest.raises(KlgapError, match="unknown_section"):
        validate_report(data)
