"""Reading a report.json: the one place a report file is validated (with every registered section typed:
klgap/report/sections.py) and where keys of older schema versions would be migrated.

``python -m klgap.report.read > klgap/report/report.schema.json`` regenerates the committed JSON Schema (the core
models of klgap/report/schema.py with their sections); a test checks it is current.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from klgap.errors import KlgapError
from klgap.report.schema import SCHEMA_VERSION, Report, StudyReport, major_version
from klgap.report.sections import report_model


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A report of an older minor version as this version reads it. Every 0.x key is still read as written (new
    keys are optional); a key renamed or moved is mapped here, once, for every reader."""
    return data


def validate_report(data: dict[str, Any], source: str = "report") -> Report | StudyReport:
    """Check a report dict against the schema and its sections; raise KlgapError naming the first problems."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version is None:
        raise KlgapError(f"{source} has no schema_version; it is not a klgap report")
    if major_version(version) != major_version(SCHEMA_VERSION):
        raise KlgapError(
            f"{source} has schema_version {version}, this klgap reads {major_version(SCHEMA_VERSION)}.x "
            f"(it writes {SCHEMA_VERSION})"
        )
    model = report_model("study" if data.get("kind") == "study" else "run")
    try:
        return model.model_validate(migrate(data))
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


def json_schema() -> dict[str, Any]:
    """The JSON Schema of report.json: a run's report or a study's, with every registered section."""
    from pydantic.json_schema import models_json_schema

    _, defs = models_json_schema([(report_model("run"), "validation"), (report_model("study"), "validation")])
    schema = {"oneOf": [{"$ref": "#/$defs/Report"}, {"$ref": "#/$defs/StudyReport"}], **defs}
    schema["$id"] = f"https://klgap.invalid/report.schema.json#{SCHEMA_VERSION}"
    schema["title"] = f"klgap report {SCHEMA_VERSION}"
    return schema


__all__ = ["json_schema", "load_report", "migrate", "validate_report"]


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
