"""`klgap validate` on everything klgap writes: a run or curve report.json, a study's, compare.json — each against
its own schema, then its values; a file of another kind is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klgap.cli.main import main
from klgap.report.schema import SCHEMA_VERSION

RESULTS = Path(__file__).resolve().parents[2] / "replications" / "cross-model-robustness" / "results"
COMPARE = RESULTS / "compare.json"


def _validate(capsys, path) -> tuple[int, str, str]:
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_committed_compare_schema_is_current():
    from klgap.report.compare_schema import json_schema

    committed = json.loads((Path(__file__).parents[2] / "klgap" / "report" / "compare.schema.json").read_text())
    assert committed == json_schema(), "regenerate with: python -m klgap.report.compare_schema > klgap/report/compare.schema.json"


def test_each_kind_is_read_from_the_file(capsys):
    n_runs = len(json.loads(COMPARE.read_text())["runs"])
    curve_run = RESULTS / "smollm2" / "mlp_out_L10" / "report.json"
    n_points = len(json.loads(curve_run.read_text())["curve"]["points"])
    study = json.loads((RESULTS / "smollm2" / "report.json").read_text())
    for path, file, what in ((COMPARE, COMPARE, f"comparison (compare.json, {n_runs} runs)"),
                             (RESULTS, COMPARE, f"comparison (compare.json, {n_runs} runs)"),  # a compare folder
                             (curve_run, curve_run, f"report with a robustness curve ({n_points} points)"),
                             (RESULTS / "smollm2", RESULTS / "smollm2" / "report.json",
                              f"study report ({len(study['runs'])} runs)")):
        version = json.loads(file.read_text())["schema_version"]
        code, out, _ = _validate(capsys, path)
        inner = len([p for p in path.rglob("*/report.json")]) if path.is_dir() else 0  # a folder is checked whole
        tail = f"; and the {inner} klgap files inside it" if inner else ""
        assert code == 0 and out.strip() == f"{path}: valid klgap {what} (schema {version}; values checked{tail})"


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["runs"][0].update(ratio=99.0, ratio_ci_low=1.0, ratio_ci_high=100.0),
     "runs[0].ratio: 99.0 is not kl_sae / kl_epsilon_random = "),
    (lambda d: d["runs"][1]["curve"]["points"][0].update(cos=1.5), "runs[1].curve.points[0].cos: a cosine of 1.5 lies "
                                                                   "outside [-1, 1]"),
    (lambda d: d["runs"][0].update(kl_sae=-0.5), "runs[0].kl_sae: KL -0.5 is negative"),
    (lambda d: d["runs"][2].update(ratio_ci_low=50.0), "runs[2].ratio: "),
    (lambda d: d["runs"][0].pop("label"), f"does not match the compare schema {SCHEMA_VERSION}: runs.0.label: Field "
                                          "required"),
])
def test_a_bad_compare_json_names_its_first_bad_value(tmp_path, capsys, edit, message):
    data = json.loads(COMPARE.read_text())
    edit(data)
    bad = tmp_path / "compare.json"
    bad.write_text(json.dumps(data))
    code, _, err = _validate(capsys, bad)
    assert code == 2 and err.startswith("klgap: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_files_of_other_kinds_are_refused_by_name(tmp_path, capsys):
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"kind": "record", "model": "tiny-gpt2"}))
    code, _, err = _validate(capsys, run_json)
    assert code == 2 and "not a file klgap validates (kind 'record'); it validates report.json" in err
    code, _, err = _validate(capsys, tmp_path)
    assert code == 2 and "holds no report.json or compare.json" in err
    (tmp_path / "x.json").write_text("[1, 2]")
    code, _, err = _validate(capsys, tmp_path / "x.json")
    assert code == 2 and "not a file klgap validates (kind None)" in err
