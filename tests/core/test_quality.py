"""The SAE's quality beside every verdict (klgap/report/quality.py): the opening sentence names its explained
variance, L0 and kl_div_score; an SAE that is not a working one (x̂ = 0, EV ≤ 0, dense codes, few training tokens)
gets a note in the opening block, on stderr, in report.json, on a study's page and in `klgap compare`."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

import klgap
from klgap.cli.main import main
from klgap.plan.sites import hook_name
from klgap.report.compare_schema import validate_compare
from klgap.report.quality import TRAINING_TOKEN_FLOOR, SaeQuality, training_tokens
from klgap.report.schema import SAEInfo
from tests.helpers import checkpoint, pca_sae, write_sae

HOOK = hook_name("resid_pre", 1)
ARGS = ["--model", "tiny-gpt2", "--dataset", "random", "--tokens", "256", "--context-len", "32", "--batch-size", "4",
        "--interventions", "sae,zero,epsilon_random"]


def zero_sae(path, d: int = 64, d_sae: int = 128, hook: str | None = HOOK):
    """x̂ = 0: no feature fires (zero encoder, zero bias) and the decoder and its bias are zero."""
    return write_sae(path, torch.zeros(d, d_sae), torch.zeros(d_sae, d), torch.zeros(d_sae), torch.zeros(d), hook)


def working_sae(path, lm, hook: str = HOOK):
    """An SAE of the top 8 principal components of the site's activations (L0 8 of 64): it explains most variance."""
    from klgap.sae.gather import gather

    site, layer = ("resid_pre", int(hook.split(".")[1]))
    contexts = torch.randint(0, lm.vocab_size, (64, 32), generator=torch.Generator().manual_seed(7))
    return pca_sae(path, gather(lm, site, layer, contexts), 8, 128, hook)


def _opening(folder) -> str:
    lines = [line for line in (folder / "report.md").read_text().splitlines() if line]
    assert lines[0].startswith("# klgap report")
    return lines[1]


def test_a_zero_output_sae_opens_with_a_quality_note(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="klgap"):
        assert main(["replicate", *ARGS, "--sae", str(zero_sae(tmp_path / "zero.safetensors")), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["schema_version"] == "0.7.0"
    assert data["sae_metrics"]["l0_mean"] == 0 and data["sae_metrics"]["x_hat_norm_mean"] == 0
    assert data["sae_metrics"]["explained_variance"] < 0
    notes = data["quality_notes"]
    assert [n["kind"] for n in notes] == ["no_active_features", "explained_variance_not_positive"]
    assert "this compares a near-zero ablation with noise" in notes[0]["text"]
    assert notes[1]["text"].endswith("than their mean does; as an x̂ near zero gives")
    ev = data["sae_metrics"]["explained_variance"]
    assert f"explained variance {ev:.3f} ≤ 0" in notes[1]["text"]
    # x̂ = 0 is zero ablation at the tokens the SAE patches; `zero` also ablates position 0 (as sae_lens's
    # zero-ablation hook does), so the two differ by that position alone and kl_div_score is far from 1
    kl_sae, kl_zero = (data["interventions"][name]["kl_mean"] for name in ("sae", "zero"))
    assert kl_sae > 0 and kl_zero > 0
    score = data["sae_lens_scores"]["kl_div_score"]
    assert score == pytest.approx((kl_zero - kl_sae) / kl_zero) and abs(score) < 0.5
    opening = _opening(out)  # report.md's opening block: the verdict, its SAE's numbers, then the notes
    assert f"the SAE's reconstruction (explained variance {ev:.3f}, L0 0, {_scored(data)}) moves" in opening
    assert opening.index("moves the next-token distribution") < opening.index("Quality note: L0 is 0")
    assert "this compares a near-zero ablation with noise" in opening
    assert "Quality note: L0 is 0" in (out / "report.html").read_text()
    assert "Quality note: L0 is 0" in printed and "this compares a near-zero ablation" in printed
    warned = [r.getMessage() for r in caplog.records if "quality note" in r.getMessage()]  # stderr at the run's end
    assert len(warned) == 2 and all(m.startswith(f"quality note on the SAE at {HOOK}: ") for m in warned)
    result = klgap.load_run(out)
    assert "Quality note: L0 is 0" in result.verdict() and "Quality note: L0 is 0" in repr(result)
    assert [n.kind for n in result.report.quality_notes] == ["no_active_features", "explained_variance_not_positive"]


def _scored(data: dict) -> str:
    """What the opening sentence says after L0 when zero ablation was measured: 'kl_div_score 0.951, ce_loss_score
    0.940, clean CE 3.214 nats/token' (the clean CE is the mean of the parts' ce_clean, tests/core/test_clean_ce.py)."""
    scores = data["sae_lens_scores"]
    ce = ("ce_loss_score withheld" if scores.get("ce_loss_score_withheld")
          else f"ce_loss_score {scores['ce_loss_score']:.3f}")
    return f"kl_div_score {scores['kl_div_score']:.3f}, {ce}, clean CE {data['ce_clean']['mean']:.3f} nats/token"


def test_a_working_sae_names_its_explained_variance_and_l0(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    out = tmp_path / "run"
    assert main(["replicate", *ARGS, "--sae", str(working_sae(tmp_path / "s.safetensors", lm)), "--out", str(out),
                 "--quiet"]) == 0
    result = klgap.load_run(out)
    report, tokens = result.report, pd.read_parquet(out / "tokens.parquet")
    ev, l0 = report.sae_metrics.explained_variance, report.sae_metrics.l0_mean
    assert 0 < ev < 1 and 0 < l0 < lm.d_model / 2 and report.quality_notes == []
    # L0 is the mean of the per-token L0; kl_div_score is (KL_zero − KL_sae) / KL_zero from the per-token KLs
    assert l0 == pytest.approx(tokens.query("intervention == 'sae'").l0.mean(), rel=1e-6)
    kl = tokens.groupby("intervention").kl.mean()
    score = (kl["zero"] - kl["sae"]) / kl["zero"]
    assert 0 < score < 1
    assert report.sae_lens_scores.kl_div_score == pytest.approx(score, rel=1e-6)
    words = (f"the SAE's reconstruction (explained variance {ev:.3f}, L0 {l0:.3g}, "
             f"{_scored(json.loads((out / 'report.json').read_text()))}) moves")
    assert words in result.verdict() and words in _opening(out)
    assert "Quality note" not in result.verdict()


def test_an_sae_trained_on_few_tokens_gets_a_note(tmp_path):
    folder = tmp_path / "sae"
    checkpoint(folder, 1, site="resid_pre", layer=1)
    record = json.loads((folder / "training.json").read_text())
    (folder / "training.json").write_text(json.dumps({**record, "n_training_tokens": 40_000}))
    out = tmp_path / "run"
    assert main(["replicate", *ARGS, "--sae", str(folder), "--out", str(out), "--quiet"]) == 0
    notes = klgap.load_run(out).report.quality_notes  # (this random sae_lens SAE is a bad one too: EV < 0, L0 > 32)
    assert [n.kind for n in notes] == ["explained_variance_not_positive", "dense_codes", "few_training_tokens"]
    assert notes[-1].text.startswith("the SAE was trained on 40,000 tokens (its training.json), fewer than 1,000,000")
    assert "Quality note: the SAE was trained on 40,000 tokens" in _opening(out)


@pytest.mark.parametrize(("numbers", "kinds"), [
    ({"explained_variance": 0.0, "l0_mean": 5.0}, ["explained_variance_not_positive"]),  # EV ≤ 0, the boundary
    ({"explained_variance": 1e-9, "l0_mean": 5.0}, []),
    ({"explained_variance": 0.8, "l0_mean": 32.0}, []),  # L0 = d_in / 2 is not above it
    ({"explained_variance": 0.8, "l0_mean": 32.5}, ["dense_codes"]),
    ({"explained_variance": 0.8, "l0_mean": 5.0, "training_tokens": TRAINING_TOKEN_FLOOR - 1}, ["few_training_tokens"]),
    ({"explained_variance": 0.8, "l0_mean": 5.0, "training_tokens": TRAINING_TOKEN_FLOOR}, []),
    ({"explained_variance": None, "l0_mean": None}, []),  # numbers the report does not have: no note on them
])
def test_the_notes_fire_at_their_thresholds(numbers, kinds):
    assert [n.kind for n in SaeQuality(d_in=64, **numbers).notes()] == kinds


def test_l0_zero_names_a_constant_unless_it_is_near_zero():
    constant = SaeQuality(0.1, 0.0, 64, x_hat_norm_mean=2.0, x_norm_mean=3.0).notes()
    assert [n.kind for n in constant] == ["no_active_features"] and "by a constant" in constant[0].text
    near_zero = SaeQuality(0.1, 0.0, 64, x_hat_norm_mean=0.02, x_norm_mean=3.0).notes()
    assert "near-zero ablation" in near_zero[0].text
    shrunk = SaeQuality(-0.9, 3.0, 64, x_hat_norm_mean=0.02, x_norm_mean=3.0).notes()  # features fire, x̂ ≈ 0
    assert [n.kind for n in shrunk] == ["explained_variance_not_positive"]
    assert shrunk[0].text.endswith("x̂ is near zero: this compares a near-zero ablation with noise, not an SAE's errors")
    assert training_tokens(SAEInfo(source="s", hook_name=None, architecture="standard", d_in=64, d_sae=128,
                                   info={"training": {"n_training_tokens": 114015}})) == 114015
    assert training_tokens(SAEInfo(source="s", hook_name=None, architecture="standard", d_in=64, d_sae=128)) is None


def test_a_study_page_and_compare_show_each_saes_quality(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    zero_sae(tmp_path / "resid_pre-L0.safetensors", hook=hook_name("resid_pre", 0))
    working_sae(tmp_path / "resid_pre-L1.safetensors", lm, hook_name("resid_pre", 1))
    study = tmp_path / "study"
    assert main(["replicate", *ARGS, "--site", "resid_pre", "--layer", "0,1", "--quiet",
                 "--sae", str(tmp_path / "{site}-L{layer}.safetensors"), "--out", str(study)]) == 0
    page = (study / "report.md").read_text()
    report = klgap.load_run(study / "resid_pre_L01").report
    assert f"| {report.sae_metrics.explained_variance:.3f} | {report.sae_metrics.l0_mean:.4g} |" in page
    assert "- resid_pre L0: L0 is 0: no feature of the SAE is active" in page
    assert "resid_pre L1" not in page.split("Quality notes")[1].split("own page")[0]  # the working SAE has none

    out = tmp_path / "compared"
    assert main(["compare", str(study), "--out", str(out)]) == 0
    data = validate_compare(json.loads((out / "compare.json").read_text()))
    zero_row, working = data.runs
    assert zero_row.l0_mean == 0 and zero_row.explained_variance < 0 and len(zero_row.quality_notes) == 2
    assert working.l0_mean == pytest.approx(report.sae_metrics.l0_mean) and working.quality_notes == []
    assert working.kl_div_score == pytest.approx(report.sae_lens_scores.kl_div_score)
    table = pd.read_csv(out / "compare.csv")
    assert table.explained_variance.tolist() == pytest.approx([zero_row.explained_variance, working.explained_variance])
    assert table.quality_notes.fillna("").tolist()[1] == "" and "near-zero ablation" in table.quality_notes[0]
    md = (out / "compare.md").read_text()
    assert "| explained variance | L0 |" in md and "Quality notes" in md and "near-zero ablation" in md
