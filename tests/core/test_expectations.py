"""expected.json files and their verdicts (klgap/report/expectations.py): every replication's targets validate and name
files beside them; the committed SmolLM2 results meet their own targets; a synthetic GPT-2 run is judged
against the study's figures target by target, from its files alone."""

from __future__ import annotations

import copy
import json
import shutil
import tomllib
from pathlib import Path

import pytest

from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.report.expectations import (
    CHECK_FILE, EXPECTED_FILE, Target, check_run, expected_beside, load_check, load_expected, targets_for_run,
)
from klgap.plan.grid import parse_layers
from klgap.report.schema import SCHEMA_VERSION
from klgap.report.read import load_report, validate_report
from tests.close import FLOAT64_STATISTIC, assert_close_tree

REPLICATIONS = Path(__file__).resolve().parents[2] / "replications"
GPT2 = REPLICATIONS / "gpt2-small-res-jb"
COMMITTED = [  # (results folder, its expected.json, targets of its file)
    ("smollm2-135m-offline/results/all_tokens", "smollm2-135m-offline", 12),
    ("smollm2-135m-offline/results/single_token", "smollm2-135m-offline", 12),
    ("smollm2-135m-offline/results/many_samples", "smollm2-135m-offline", 3),
    ("smollm2-135m-quickstart/results", "smollm2-135m-quickstart", 1),
    ("cross-model-robustness/results/smollm2", "cross-model-robustness", 8),
    ("cross-model-robustness/results/gemma3", "cross-model-robustness", 8),
]


def test_every_replication_with_results_or_a_study_target_has_a_valid_expected_json():
    folders = {p.parent.name for p in REPLICATIONS.glob(f"*/{EXPECTED_FILE}")}
    assert folders >= {"gpt2-small-res-jb", "gpt2-small-attn", "smollm2-135m-offline", "smollm2-135m-quickstart",
                       "cross-model-robustness"}
    for path in REPLICATIONS.glob(f"*/{EXPECTED_FILE}"):
        expected = load_expected(path)
        assert expected.targets, path
        for target in expected.targets:  # each target names a file beside it and layers that file measures
            declared = tomllib.loads((path.parent / target.config).read_text())
            layers = parse_layers(str(declared["layer"]))
            assert target.layers is None or set(target.layers) <= set(layers), (path, target.name)
            assert target.site is None or target.site in declared["site"].split(","), (path, target.name)


@pytest.mark.parametrize(("results", "replication", "n_targets"), COMMITTED, ids=[c[0] for c in COMMITTED])
def test_committed_results_meet_their_own_targets(results, replication, n_targets):
    check = check_run(REPLICATIONS / results, REPLICATIONS / replication / EXPECTED_FILE)
    assert len(check.verdicts) == n_targets
    assert check.replicated, [v.text for v in check.verdicts if v.status != "matches"]
    for v in check.verdicts:
        (m,) = v.measurements  # one site/layer per committed target
        low, high = v.target.bounds
        assert low <= m.value <= high
        assert_close_tree(v.target.value, m.value, (results, v.target.name), FLOAT64_STATISTIC)  # the committed number


def test_a_result_outside_its_interval_differs(tmp_path):
    folder = tmp_path / "quick"
    shutil.copytree(REPLICATIONS / "smollm2-135m-quickstart" / "results", folder)
    data = json.loads((folder / "report.json").read_text())
    data["comparisons"]["epsilon_random"]["kl_ratio"].update(ratio=1.30, ci_low=1.25, ci_high=1.35)
    (folder / "report.json").write_text(json.dumps(data))
    (verdict,) = check_run(folder, REPLICATIONS / "smollm2-135m-quickstart" / EXPECTED_FILE).verdicts
    assert verdict.status == "differs"
    assert verdict.text == ("mlp_out L15 KL ratio sae/epsilon_random: 1.300 [1.250, 1.350], in [1.423, 1.522]: "
                            "differs from the committed result 1.469 (mlp_out L15 1.3 outside)")


def test_a_model_without_targets_is_told_so(tmp_path):
    """The cross-model file holds SmolLM2's and Gemma's targets (Gemma re-run at its post-norm sites, issue 22; its
    results are checked in COMMITTED); a run of another model is told it has none."""
    study = _synthetic_gpt2_study(tmp_path / "gpt2", {layer: 2.5 for layer in range(12)})
    with pytest.raises(KlgapError, match=r"no target for this run's model and mode \(its files: smollm2.toml, gemma3.toml"):
        check_run(study, REPLICATIONS / "cross-model-robustness" / EXPECTED_FILE)


@pytest.mark.parametrize("bad", [
    {"interval": [1, 2], "rel_tol": 0.1, "value": 1.5},  # two intervals
    {"rel_tol": 0.1},  # a tolerance without a value
    {"interval": [2, 1]},  # empty
    {"interval": [None, None]},  # unbounded
    {"interval": [1, 2], "offset": 1},  # offset without kl_ratio_at_offset
])
def test_bad_targets_are_refused_with_the_target_named(tmp_path, bad):
    target = {"name": "t1", "config": "all_tokens.toml", "quantity": "kl_ratio", **bad}
    path = tmp_path / EXPECTED_FILE
    path.write_text(json.dumps({"targets": [target]}))
    with pytest.raises(KlgapError, match=r"is not a valid expectations file: .*t1"):
        load_expected(path)
    path.write_text("{not json")
    with pytest.raises(KlgapError, match="is not a valid expectations file"):
        load_expected(path)


# ----------------------------------------------------------------------------- a synthetic GPT-2 run


STUDY_KL = {"sae_norm_corrected": 0.162968, "sae_norm": 0.002826, "theta_random": 0.068710, "theta_random_xnorm": 0.064858}


def _synthetic_gpt2_study(folder: Path, ratio_by_layer: dict[int, float], single: dict[int, tuple[float, float]] | None = None) -> Path:
    """A study folder shaped like `klgap replicate --config gpt2-small-res-jb/all_tokens.toml` (or single_token.toml)
    writes, built from a committed SmolLM2 report with GPT-2's names and the given numbers."""
    src = REPLICATIONS / "smollm2-135m-offline" / "results" / ("single_token" if single else "all_tokens")
    study = json.loads((src / "report.json").read_text())
    template = json.loads((src / study["runs"][0]["path"] / "report.json").read_text())
    declared = tomllib.loads((GPT2 / ("single_token.toml" if single else "all_tokens.toml")).read_text())
    config = {**template["config"], **{k: declared[k] for k in ("model", "site", "layer", "mode")}}
    runs = []
    for layer, ratio in ratio_by_layer.items():
        run = copy.deepcopy(template)
        kl_eps = 0.060838
        run.update(model="gpt2", site="resid_pre", layer=layer, hook_name=f"blocks.{layer}.hook_resid_pre",
                   config=config, schema_version=SCHEMA_VERSION)
        for name, kl in STUDY_KL.items():  # the study's layer-6 means (eval.ipynb)
            run["interventions"][name]["kl_mean"] = kl
        run["interventions"]["sae"].update(kl_mean=ratio * kl_eps, ce_delta_mean=0.137)
        run["interventions"]["epsilon_random"].update(kl_mean=kl_eps, ce_delta_mean=0.0583)
        run["comparisons"]["epsilon_random"]["kl_ratio"].update(ratio=ratio, ci_low=ratio - 0.06, ci_high=ratio + 0.06)
        run["comparisons"]["epsilon_random"]["ce_delta_ratio"].update(ratio=0.137 / 0.0583)
        if single:
            t, t1 = single[layer]
            run["single_token"]["kl_by_offset"]["sae"].update({"0": t * 0.01, "1": t1 * 0.01})
            run["single_token"]["kl_by_offset"]["epsilon_random"].update({"0": 0.01, "1": 0.01})
        path = f"resid_pre_L{layer:02d}"
        (folder / path).mkdir(parents=True)
        (folder / path / "report.json").write_text(json.dumps(validate_report(run).model_dump(mode="json")))
        runs.append({**{k: run[k] for k in study["runs"][0] if k in run}, "path": path})
    study.update(model="gpt2", runs=runs, config=config, schema_version=SCHEMA_VERSION)
    (folder / "report.json").write_text(json.dumps(study))
    assert load_report(folder).kind == "study"
    return folder


def test_a_synthetic_gpt2_run_meets_the_studys_layer_6_figures_and_layer_range(tmp_path):
    ratios = {layer: 2.3 + 0.15 * layer for layer in range(12)}  # 2.3 … 3.95, layer 6 at 3.2
    ratios[6] = 2.47
    folder = _synthetic_gpt2_study(tmp_path / "run", ratios)
    check = check_run(folder, GPT2 / EXPECTED_FILE)
    assert [t.config for t in (v.target for v in check.verdicts)] == ["all_tokens.toml"] * 12  # chosen by model+mode
    by_name = {v.target.name: v for v in check.verdicts}
    ratio = by_name["layer 6 KL ratio sae/epsilon_random"]
    assert ratio.status == "matches"
    assert ratio.text == ("layer 6 KL ratio sae/epsilon_random: 2.470 [2.410, 2.530], in [2.281, 2.787]: "
                          "matches the study's 2.534")
    span = by_name["KL ratio sae/epsilon_random at every layer"]
    assert span.status == "matches" and len(span.measurements) == 12
    assert span.text == "KL ratio sae/epsilon_random at every layer: 2.3–3.95 over 12 runs, in [2.2, 4.5]: matches the study's 2.2×–4.5×"
    assert check.replicated, [v.text for v in check.verdicts if v.status != "matches"]
    assert by_name["layer 6 KL sae"].text == "layer 6 KL sae: 0.1503, in [0.131, 0.1773]: matches the study's 0.1542"

    ratios[11] = 1.9  # one layer below the study's range
    shutil.rmtree(folder)
    folder = _synthetic_gpt2_study(tmp_path / "run", ratios)
    span = {v.target.name: v for v in check_run(folder, GPT2 / EXPECTED_FILE).verdicts}["KL ratio sae/epsilon_random at every layer"]
    assert span.status == "differs"
    assert span.text.endswith("differs from the study's 2.2×–4.5× (resid_pre L11 1.9 outside)")

    del ratios[3]  # a layer the study covers but the run lacks
    shutil.rmtree(folder)
    folder = _synthetic_gpt2_study(tmp_path / "run", ratios)
    span = {v.target.name: v for v in check_run(folder, GPT2 / EXPECTED_FILE).verdicts}["KL ratio sae/epsilon_random at every layer"]
    assert span.status == "not measured" and "L3" in span.text


def test_a_synthetic_single_token_run_against_the_studys_exception_at_layer_11(tmp_path):
    single = {layer: (3.0, 2.5) for layer in range(12)}
    single[11] = (2.6, 1.4)  # the study's own exception: t+1 at layer 11 has no target
    folder = _synthetic_gpt2_study(tmp_path / "st", {layer: 2.5 for layer in range(12)}, single)
    check = check_run(folder, GPT2 / EXPECTED_FILE)
    assert [v.target.config for v in check.verdicts] == ["single_token.toml"] * 2
    assert check.replicated, [v.text for v in check.verdicts]
    single[5] = (1.8, 2.5)
    shutil.rmtree(folder)
    folder = _synthetic_gpt2_study(tmp_path / "st", {layer: 2.5 for layer in range(12)}, single)
    first = check_run(folder, GPT2 / EXPECTED_FILE).verdicts[0]
    assert first.status == "differs" and "(resid_pre L5 1.8 outside)" in first.text


def test_klgap_check_prints_writes_and_renders_the_verdicts(tmp_path, capsys):
    folder = tmp_path / "quick"
    shutil.copytree(REPLICATIONS / "smollm2-135m-quickstart" / "results", folder)
    expected = str(REPLICATIONS / "smollm2-135m-quickstart" / EXPECTED_FILE)
    assert main(["check", str(folder), "--expected", expected]) == 0
    assert "1 of 1 targets match" in capsys.readouterr().out
    assert not (folder / CHECK_FILE).exists()
    assert main(["check", str(folder), "--expected", expected, "--write"]) == 0
    assert load_check(folder).replicated
    md = (folder / "report.md").read_text()
    assert "## Replication targets" in md and "matches the committed result 1.469" in md
    assert "Replication targets" in (folder / "report.html").read_text()
    # a target that is not met: exit 3
    data = json.loads((folder / "report.json").read_text())
    data["comparisons"]["epsilon_random"]["kl_ratio"]["ratio"] = 2.0
    (folder / "report.json").write_text(json.dumps(data))
    assert main(["check", str(folder), "--expected", expected]) == 3
    assert main(["check", str(folder), "--expected", expected, "--for", "nope.toml"]) == 2


def test_replicate_config_checks_the_expected_json_beside_it(tmp_path, capsys):
    """`klgap replicate --config FILE` ends with the verdicts of expected.json's targets for FILE, written beside
    the report and rendered in it; a broken expected.json is refused before anything runs."""
    rep = tmp_path / "rep"
    rep.mkdir()
    out = tmp_path / "run"
    (rep / "tiny.toml").write_text(
        'model = "tiny-gpt2"\nsite = "mlp_out"\nlayer = 1\nmode = "all_tokens"\ndataset = "random"\n'
        'interventions = ["sae", "epsilon_random", "zero"]\ntokens = 256\ncontext_len = 32\nbatch_size = 4\n'
        f'device = "cpu"\nout = "{out}"\n'
    )
    targets = [
        {"name": "KL ratio", "config": "tiny.toml", "quantity": "kl_ratio", "interval": [0.0, 1000.0]},
        {"name": "kl_div_score", "config": "tiny.toml", "quantity": "kl_div_score", "interval": [None, 1.0]},
        {"name": "layer 0 (not run)", "config": "tiny.toml", "quantity": "kl_mean", "layers": [0], "interval": [0, 1]},
        {"name": "another file", "config": "other.toml", "quantity": "kl_mean", "interval": [0, 1]},
    ]
    (rep / EXPECTED_FILE).write_text(json.dumps({"targets": targets}))
    from tests.helpers import random_sae

    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_mlp_out")
    assert main(["replicate", "--config", str(rep / "tiny.toml"), "--sae", str(sae), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "replication targets" in printed and "2 of 3 targets match" in printed
    check = load_check(out)
    assert [v.status for v in check.verdicts] == ["matches", "matches", "not measured"]
    report = load_report(out)
    assert check.verdicts[1].measurements[0].value == report.sae_lens_scores.kl_div_score
    assert "## Replication targets" in (out / "report.md").read_text()
    assert expected_beside(rep / "other.toml")[1][0].name == "another file"
    with pytest.raises(KlgapError, match="names replication file 'other.toml', which is not beside it"):
        targets_for_run(rep / EXPECTED_FILE, load_expected(rep / EXPECTED_FILE), report)
    (rep / "other.toml").write_text('model = "tiny-pythia"\n')
    chosen = targets_for_run(rep / EXPECTED_FILE, load_expected(rep / EXPECTED_FILE), report)
    assert [t.name for t in chosen] == ["KL ratio", "kl_div_score", "layer 0 (not run)"]  # tiny.toml's: same model

    (rep / EXPECTED_FILE).write_text(json.dumps({"targets": [{**targets[0], "rel_tol": 0.1}]}))
    assert main(["replicate", "--config", str(rep / "tiny.toml"), "--sae", str(sae), "--quiet", "--out",
                 str(tmp_path / "never")]) == 2
    assert "is not a valid expectations file" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_target_bounds():
    assert Target(name="a", config="x.toml", quantity="kl_mean", value=2.0, rel_tol=0.1).bounds == pytest.approx((1.8, 2.2))
    assert Target(name="a", config="x.toml", quantity="kl_mean", value=2.0, abs_tol=0.5).bounds == (1.5, 2.5)
    assert Target(name="a", config="x.toml", quantity="kl_mean", interval=(2.0, None)).bounds_text() == "≥ 2"
