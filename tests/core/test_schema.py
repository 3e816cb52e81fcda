"""report.json's schema: the committed JSON Schema is current; bad reports are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klgap.errors import KlgapError
from klgap.report.schema import SCHEMA_VERSION
from klgap.report.read import json_schema, load_report, validate_report


def test_committed_json_schema_is_current():
    committed = json.loads((Path(__file__).parents[2] / "klgap" / "report" / "report.schema.json").read_text())
    assert committed == json_schema(), "regenerate with: python -m klgap.report.read > klgap/report/report.schema.json"


def test_missing_and_foreign_versions(tmp_path):
    with pytest.raises(KlgapError, match="no schema_version"):
        validate_report({"model": "x"})
    with pytest.raises(KlgapError, match=r"schema_version 9\.0\.0, this klgap reads 0\.x"):
        validate_report({"schema_version": "9.0.0"})
    with pytest.raises(KlgapError, match=f"does not match the report schema {SCHEMA_VERSION}: site: Field required"):
        validate_report({"schema_version": SCHEMA_VERSION})
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(KlgapError, match="not valid JSON"):
        load_report(tmp_path)
    with pytest.raises(KlgapError, match="no report at"):
        load_report(tmp_path / "elsewhere")
