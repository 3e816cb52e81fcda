"""`klgap validate` checks every value it can in every kind of file klgap writes (run, curve, study, joint,
checkpoint study, compare, expected_check), with one set of value rules (klgap/report/validate.py): each row edits
one committed file as a hand (or a bug) would and asserts the one line that names the JSON path (issue 28)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from klgap.cli.main import main

REPLICATIONS = Path(__file__).resolve().parents[2] / "replications"
RUN = REPLICATIONS / "smollm2-135m-quickstart" / "results" / "report.json"
CURVE = REPLICATIONS / "cross-model-robustness" / "results" / "smollm2" / "mlp_out_L10" / "report.json"
STUDY = REPLICATIONS / "cross-model-robustness" / "results" / "smollm2" / "report.json"
COMPARE = REPLICATIONS / "cross-model-robustness" / "results" / "compare.json"
JOINT = REPLICATIONS / "compounding" / "results" / "report.json"
CHECKPOINTS = REPLICATIONS / "sae-training" / "results" / "report.json"


def _check_file(folder: Path) -> Path:
    """A run folder (the quickstart's report) checked against its expected.json: expected_check.json as klgap
    writes it."""
    from klgap.report.expectations import check_run, write_check

    shutil.copy(RUN, folder / "report.json")
    return write_check(folder, check_run(folder, RUN.parents[1] / "expected.json"))


def _bump(value: float) -> float:
    return value * 1.5 + 1


ROWS = [  # (file, edit, the message after "FILE: ")
    (COMPARE, lambda d: d.update(runs=[]), "runs: is empty: klgap compare writes one row per compared site/layer"),
    (COMPARE, lambda d: d["runs"][0].update(n_tokens=-5), "runs[0].n_tokens: a count of -5 is negative"),
    (COMPARE, lambda d: d["runs"][0].update(p_holm=0.25, p_value=0.5),
     "runs[0].p_holm: 0.25 is below its uncorrected p_value 0.5"),
    (STUDY, lambda d: d["runs"][0]["comparisons"]["epsilon_random"]["wilcoxon_kl"].update(p_value=0.5, p_holm=0.1),
     "runs[0].comparisons.epsilon_random.wilcoxon_kl.p_holm: 0.1 is below its uncorrected p_value 0.5"),
    (STUDY, lambda d: d["gap_correlation_between_runs"][0].update(n=-1), "gap_correlation_between_runs[0].n: a count "
                                                                           "of -1 is negative"),
    (CURVE, lambda d: d["curve"]["points"][0].update(cos=2), "curve.points[0].cos: a cosine of 2 lies outside [-1, 1]"),
    (CURVE, lambda d: d["curve"]["points"][0].update(norm_frac=-0.9), "curve.points[0].norm_frac: a norm of -0.9 is "
                                                                       "negative"),
    (CURVE, lambda d: d["curve"]["sae_equivalent_cos"].update(epsilon_random=1.7),
     "curve.sae_equivalent_cos.epsilon_random: a cosine of 1.7 lies outside [-1, 1]"),
    (JOINT, lambda d: d["compounding"]["additivity"]["sae"].update(joint_kl_mean=-0.1),
     "compounding.additivity.sae.joint_kl_mean: KL -0.1 is negative"),
    (JOINT, lambda d: d["compounding"]["sites"][0]["kl_mean"].update(sae=-0.2),
     "compounding.sites[0].kl_mean.sae: KL -0.2 is negative"),
    (JOINT, lambda d: d["compounding"].pop("subsets"), "compounding.subsets: is missing, but the run's config asked "
                                                       "for --joint-subsets"),
    (JOINT, lambda d: d["compounding"]["joint_kl_ratio"].update(ratio=-1.0, ci_low=-2.0),
     "compounding.joint_kl_ratio.ratio: a ratio of KLs of -1.0 is negative"),
    (CHECKPOINTS, lambda d: d["over_training"][0]["points"][1]["kl_sae"].update(mean=_bump(
        d["over_training"][0]["points"][1]["kl_sae"]["ci_high"])), "over_training[0].points[1].kl_sae.mean: "),
    (CHECKPOINTS, lambda d: d["over_training"][0]["points"].reverse(), "over_training[0].points: steps "),
    (CHECKPOINTS, lambda d: d["over_training"][0]["points"][0].update(tokens_seen=-1024),
     "over_training[0].points[0].tokens_seen: a count of -1024 is negative"),
    (RUN, lambda d: d["sae_metrics"].update(explained_variance=1.5), "sae_metrics.explained_variance: an explained "
                                                                      "variance of 1.5 is above 1"),
    (RUN, lambda d: d["comparisons"]["epsilon_random"]["ce_delta_ratio"].update(ratio=99.0),
     "comparisons.epsilon_random.ce_delta_ratio.ratio: 99.0 lies outside its interval"),
]


@pytest.mark.parametrize("source,edit,message", ROWS, ids=[
    f"{r[0].parent.name}-{r[2].split(':')[0]}" for r in ROWS])
def test_a_value_klgap_never_writes_is_named_in_every_kind_of_file(tmp_path, capsys, source, edit, message):
    assert main(["validate", str(source)]) == 0  # as committed
    data = json.loads(source.read_text())
    edit(data)
    bad = tmp_path / source.name
    bad.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"klgap: error: {bad}: {message}"), line


CHECK_ROWS = [
    (lambda d: d["verdicts"][0].update(status="differs"), "verdicts[0].status: 'differs', but its measurements give "
                                                          "'matches'"),
    (lambda d: d["verdicts"][0]["measurements"][0].update(value=9.0, ci_high=9.5),
     "verdicts[0].measurements: [{\"where\": \"mlp_out L15\", \"value\": 9.0"),
    (lambda d: d["verdicts"][0]["measurements"][0].update(value=float("nan")),
     "verdicts[0].measurements[0].value: nan is not a JSON number"),
    (lambda d: d["verdicts"][0].pop("status"), "does not match the expectation check schema: verdicts.0.status: Field "
                                               "required"),
]


@pytest.mark.parametrize("edit,message", CHECK_ROWS, ids=["status", "measurement", "nan", "schema"])
def test_a_tampered_expected_check_is_refused_by_validate_and_by_the_pages(tmp_path, capsys, edit, message):
    check = _check_file(tmp_path)
    assert main(["validate", str(check)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{check}: valid klgap check against replication targets (1 of 1 targets match) (values checked)"
    data = json.loads(check.read_text())
    edit(data)
    check.write_text(json.dumps(data))
    for argv in (["validate", str(check)], ["validate", str(tmp_path)], ["report", str(tmp_path)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"klgap: error: {check}") and message in line, line
    assert not (tmp_path / "report.md").exists()  # the pages were not drawn with a tampered check


def test_a_folder_is_validated_whole(tmp_path, capsys):
    """A study folder's sub-run reports are checked too: a bad one is named even when the study's is sound."""
    folder = shutil.copytree(STUDY.parent, tmp_path / "study")
    assert main(["validate", str(folder)]) == 0
    n_runs = len(json.loads(STUDY.read_text())["runs"])
    assert capsys.readouterr().out.strip().endswith(f"values checked; and the {n_runs} klgap files inside it)")
    sub = folder / "mlp_out_L10" / "report.json"
    data = json.loads(sub.read_text())
    data["interventions"]["sae"]["kl_median"] = -1.0
    sub.write_text(json.dumps(data))
    assert main(["validate", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == (f"klgap: error: {sub}: interventions.sae.kl_median: KL -1.0 is negative "
                                               "(a KL divergence is ≥ 0)")


@pytest.mark.parametrize("interval", [[float("nan"), 2.0], [0.5, float("inf")]])
def test_check_refuses_a_target_whose_interval_is_not_a_number(tmp_path, capsys, interval):
    expected = json.loads((RUN.parents[1] / "expected.json").read_text())
    expected["targets"][0]["interval"] = interval
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    shutil.copy(RUN.parents[1] / "config.toml", tmp_path / "config.toml")
    assert main(["check", str(RUN.parent), "--expected", str(tmp_path / "expected.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not a valid expectations file: targets.0: Value error, target 'mlp_out L15 KL ratio sae/epsilon_random'" \
           f": interval holds {interval[0] if interval[0] != 0.5 else interval[1]}; give finite numbers" in line, line
