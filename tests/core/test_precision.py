"""Low-precision runs (``--dtype bfloat16|float16|auto``, klgap/job/precision.py): the model computes in the low
precision, the patch and KL / ΔCE are float32, and a check against float32 on the first contexts is recorded,
said when it fails, and (with ``auto``) makes the run fall back to float32."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.forward import activations
from klgap.job import loading, precision
from klgap.job.batches import measure_batch
from klgap.job.cells import load_job, prepare
from klgap.job.loaded import LoadedJob
from klgap.job.plan import plan_job
from klgap.plan import dtypes
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.render.pages import rebuild
from klgap.report.read import load_report
from tests.helpers import random_sae, run_config

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def sae_path(tmp_path, load_model):
    return random_sae(tmp_path / "sae.safetensors", load_model("tiny-llama").d_model, 128, HOOK, seed=3)


@pytest.fixture(autouse=True)
def fresh_models(monkeypatch):
    """Models loaded here (some deliberately spoiled) are not left in the process's model cache."""
    monkeypatch.setattr(loading, "_MODELS", {})


def config(sae_path, dtype: str, **extra) -> RunConfig:
    return RunConfig(**{"model": "tiny-llama", "sae": str(sae_path), "tokens": 8 * 24, "context_len": 24,
                        "batch_size": 4, "device": "cpu", "dtype": dtype, "dataset": "random",
                        "interventions": ["sae", "epsilon_random", "zero"], **extra})


def test_low_precision_model_keeps_float32_buffers(load_model):
    """Parameters are rounded; rotary inv_freq stays float32, as from_pretrained(dtype=bfloat16) leaves it."""
    low = loading.load_model("tiny-llama", torch.device("cpu"), torch.bfloat16)
    reference = loading.load_model("tiny-llama", torch.device("cpu"), torch.float32)
    assert {p.dtype for p in low.hf_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reference.hf_model.parameters()} == {torch.float32}
    buffers = dict(low.hf_model.named_buffers())
    assert buffers["model.rotary_emb.inv_freq"].dtype == torch.float32
    ref_q = reference.hf_model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(low.hf_model.model.layers[0].self_attn.q_proj.weight, ref_q.bfloat16())
    # the plugin's own low-precision load keeps them too
    direct = load_model("tiny-llama").hf_model
    from klgap_hf.loaded import wrap_loaded

    wrapped = wrap_loaded("x", type(direct)(direct.config).eval(), None, torch.device("cpu"), torch.bfloat16)
    assert dict(wrapped.hf_model.named_buffers())["model.rotary_emb.inv_freq"].dtype == torch.float32


def test_low_precision_kl_is_float32_from_bfloat16_logits(sae_path):
    """A bfloat16 run's KL is the KL of the model's bfloat16 logits computed exactly (float64, by hand), to float32
    rounding: the patch x' = x̂ is computed in float32 from the bfloat16 activation and rounded once; the
    log-softmax is not taken in bfloat16 (that would be off by ~1e-2)."""
    cfg = config(sae_path, "bfloat16", interventions=["sae", "zero"], mask_special="none")
    prep = prepare(cfg)
    assert prep.model.dtype == torch.bfloat16 and prep.precision is not None
    job = LoadedJob.of_run(prep)
    [(frame, _)] = measure_batch(job, 0, job.cells)
    ids = prep.contexts[:4]
    with torch.no_grad():
        acts, clean = activations.run_clean(prep.model, prep.spec, ids)  # [4 24 d], [4 24 vocab] bfloat16
        assert clean.dtype == torch.bfloat16
        x = acts.float()
        x_hat = prep.sae.decode(prep.sae.encode(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
        logp = torch.log_softmax(clean.double(), -1)
        for name, x_prime in (("sae", x_hat), ("zero", torch.zeros_like(x))):
            patched = activations.run_patched(prep.model, prep.spec, ids, x_prime.to(torch.bfloat16))
            by_hand = (logp.exp() * (logp - torch.log_softmax(patched.double(), -1))).sum(-1)  # [4 24] float64
            ours = torch.tensor(frame[frame.intervention == name]["kl"].to_numpy()).reshape(4, 24)
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours.double(), by_hand, rtol=2e-4, atol=2e-6)
            in_bf16 = (logp.exp().bfloat16() * (torch.log_softmax(clean, -1) - torch.log_softmax(patched, -1))).sum(-1)
            assert (in_bf16.double() - by_hand).abs().max() > 10 * (ours.double() - by_hand).abs().max()
    assert by_hand.mean() > 1e-2  # the zero ablation really moves the output


def test_check_compares_the_same_rows_in_both_precisions(sae_path):
    """The recorded check is exactly the first 2 contexts measured with the float32 and the bfloat16 model, by the
    job's own batch loop, on the execution path the run measures with."""
    loaded = load_job(plan_job(config(sae_path, "bfloat16")))
    prep = loaded.runs[0]
    check = prep.precision
    assert check.passed and check.dtype == check.measured_dtype == "bfloat16" and check.n_contexts == 2
    assert prep.execution["path"] == "suffix-replay"
    reference = loading.load_model("tiny-llama", torch.device("cpu"), torch.float32)
    assert prep.reference is reference and prep.model.dtype == torch.bfloat16
    frames = []
    for model in (reference, prep.model):
        job = precision.checked_job(loaded, model, 2)
        assert job.runs[0].executor.path == "suffix-replay" and job.runs[0].executor is not prep.executor
        [(frame, _)] = measure_batch(job, 0, job.cells)
        frames.append(frame)
    measured = ["kl", "ce_delta", "ce_clean", "eps", "cos", "x_norm", "x_hat_norm", "l0"]  # numbers of each precision
    assert frames[0].drop(columns=measured).equals(frames[1].drop(columns=measured))
    assert frames[0]["ce_clean"].isna().equals(frames[1]["ce_clean"].isna())  # the clean CE on the same rows
    diff = (frames[0]["kl"] - frames[1]["kl"]).abs()
    assert check.kl_abs_diff_max == pytest.approx(diff.max(), rel=1e-12)
    assert check.kl_abs_diff_p99 == pytest.approx(np.quantile(diff, 0.99), rel=1e-12)
    means = frames[0].astype({"kl": float}).groupby("intervention")["kl"].mean()
    assert check.ratio_float32 == pytest.approx(means["sae"] / means["epsilon_random"], rel=1e-12)
    assert 0 < check.kl_abs_diff_max < 1e-3  # bfloat16 does move KL, a little
    assert check.n_tokens == 3 * 2 * 23


CAST_COPY = loading.cast_copy  # the real one (the tests below patch loading's)


def coarse_copy(model, dtype):
    """A deliberately coarse 'dtype': bfloat16 weights rounded further to powers of two (no mantissa bits)."""
    low = CAST_COPY(model, dtype)
    with torch.no_grad():
        for p in low.hf_model.parameters():
            p.copy_(torch.sign(p) * torch.exp2(torch.round(torch.log2(p.abs().float()))))
    return low


def test_check_fires_on_a_coarse_dtype(tmp_path, sae_path, monkeypatch, caplog):
    monkeypatch.setattr(loading, "cast_copy", coarse_copy)
    with caplog.at_level(logging.WARNING, logger="klgap"):
        run_config(config(sae_path, "bfloat16"), tmp_path / "run")
    assert "PRECISION CHECK FAILED" in caplog.text and "measured in bfloat16 anyway" in caplog.text
    report = load_report(tmp_path / "run")
    assert report.dtype == "bfloat16" and report.precision is not None
    assert not report.precision.passed and report.precision.kl_mean_rel_change_max > precision.TOLERANCE
    rebuild(tmp_path / "run")
    lines = (tmp_path / "run" / "report.md").read_text().splitlines()
    assert any(line.startswith("PRECISION CHECK FAILED") for line in lines[:8])  # the report's opening lines


def test_auto_falls_back_to_float32_when_the_check_fails(tmp_path, sae_path, monkeypatch, caplog):
    """--dtype auto on a CPU with bfloat16: a failed check measures in float32, the numbers of a float32 run."""
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(loading, "cast_copy", coarse_copy)
    with caplog.at_level(logging.WARNING, logger="klgap"):
        run_config(config(sae_path, "auto"), tmp_path / "auto")
    assert "measured in float32 instead (--dtype auto)" in caplog.text
    run_config(config(sae_path, "float32"), tmp_path / "fp32")
    auto, fp32 = load_report(tmp_path / "auto"), load_report(tmp_path / "fp32")
    assert auto.dtype == "float32" and auto.precision.dtype == "bfloat16" and auto.precision.measured_dtype == "float32"
    assert fp32.precision is None
    tokens = [pd.read_parquet(tmp_path / name / "tokens.parquet") for name in ("auto", "fp32")]
    pd.testing.assert_series_equal(tokens[0]["kl"], tokens[1]["kl"])


def test_auto_picks_bfloat16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert dtypes.run_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert dtypes.run_dtype("auto", cpu) == torch.float32
    assert dtypes.run_dtype("float16", cpu) == torch.float16


def test_float32_runs_have_no_check(sae_path):
    prep = prepare(config(sae_path, "float32"))
    assert prep.precision is None and prep.reference is None and prep.model.dtype == torch.float32
    assert "model.rotary_emb.inv_freq" in dict(prep.model.hf_model.named_buffers())


def _site_saes(folder, sites) -> str:
    """A random SAE per (site, layer) of tiny-llama, and the ``{site}-L{layer}`` template naming them."""
    folder.mkdir(exist_ok=True)
    for k, (site, layer) in enumerate(sites):
        random_sae(folder / f"{site}-L{layer}.safetensors", 64, 128, hook_name(site, layer), seed=k)
    return str(folder / "{site}-L{layer}.safetensors")


STUDY = [("resid_pre", 1), ("mlp_out", 1)]


def test_a_study_checks_every_site(tmp_path):
    """A bfloat16 study checks each site on the study's own path (the shared clean forward, each site's suffix
    replay): each site's report holds its check, the same numbers as that site measured alone."""
    template = _site_saes(tmp_path / "saes", STUDY)
    study = run_config(config(template, "bfloat16", site="resid_pre,mlp_out", layer=1), tmp_path / "study")
    assert [run.path for run in study.runs] == ["resid_pre_L01", "mlp_out_L01"]
    for (site, layer), row in zip(STUDY, study.runs, strict=True):
        check = load_report(tmp_path / "study" / row.path).precision
        assert check is not None and check.passed and check.n_contexts == 2 and check.n_tokens == 3 * 2 * 23
        assert 0 < check.kl_abs_diff_max < 1e-3
        alone = run_config(config(template.format(site=site, layer=layer), "bfloat16", site=site, layer=layer),
                           tmp_path / f"alone_{site}").precision
        assert check.kl_abs_diff_max == pytest.approx(alone.kl_abs_diff_max, rel=1e-5)
        assert check.ratio == pytest.approx(alone.ratio, rel=1e-6)
        assert check.interventions["sae"].kl_mean == pytest.approx(alone.interventions["sae"].kl_mean, rel=1e-6)


def test_auto_study_falls_back_as_a_whole(tmp_path, monkeypatch, caplog):
    """--dtype auto: a failed check anywhere makes the whole study measure in float32 (one model for its shared
    forwards), each site's numbers those of a float32 study."""
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(loading, "cast_copy", coarse_copy)
    template = _site_saes(tmp_path / "saes", STUDY)
    with caplog.at_level(logging.WARNING, logger="klgap"):
        run_config(config(template, "auto", site="resid_pre,mlp_out", layer=1), tmp_path / "auto")
    assert "resid_pre_L01: PRECISION CHECK FAILED" in caplog.text
    run_config(config(template, "float32", site="resid_pre,mlp_out", layer=1), tmp_path / "fp32")
    for path in ("resid_pre_L01", "mlp_out_L01"):
        auto = load_report(tmp_path / "auto" / path)
        assert auto.dtype == "float32" and auto.precision.dtype == "bfloat16"
        assert auto.precision.measured_dtype == "float32"
        tokens = [pd.read_parquet(tmp_path / name / path / "tokens.parquet") for name in ("auto", "fp32")]
        pd.testing.assert_series_equal(tokens[0]["kl"], tokens[1]["kl"])


def test_a_joint_run_checks_its_joint_cell_too(tmp_path):
    """A bfloat16 joint run: each site alone and the joint cell (every site patched in one forward, through the
    joint suffix replay) get their own check, the joint cell's from its own rows in both precisions."""
    template = _site_saes(tmp_path / "saes", [("mlp_out", 0), ("mlp_out", 1)])
    cfg = config(template, "bfloat16", site="mlp_out", layer="0,1", joint=True)
    loaded = load_job(plan_job(cfg))
    whole = next(cell for cell in loaded.cells if cell.joint)
    assert whole.execution["path"] == "joint-suffix-replay" and whole.precision is not None
    assert all(run.precision is not None for run in loaded.runs)
    frames = []
    for model in (loaded.runs[0].reference, loaded.model):
        job = precision.checked_job(loaded, model, 2)
        assert job.cells[-1].executor.path == "joint-suffix-replay"
        frames.append(list(measure_batch(job, 0, job.cells))[-1][0])
    assert whole.precision == precision.compare(frames[0], frames[1], torch.bfloat16, 2)
    assert whole.precision.interventions["sae"].kl_mean > max(run.precision.interventions["sae"].kl_mean
                                                              for run in loaded.runs)  # both sites patched
    report = run_config(cfg, tmp_path / "joint")
    assert report.precision is not None and report.precision.passed
    assert report.precision.kl_mean_rel_change_max == pytest.approx(whole.precision.kl_mean_rel_change_max, rel=1e-6)
    single = load_report(tmp_path / "joint" / "single" / "mlp_out_L00").precision
    assert single.interventions["sae"].kl_mean == pytest.approx(loaded.runs[0].precision.interventions["sae"].kl_mean,
                                                                rel=1e-6)


def test_a_held_low_precision_model_is_checked_against_one_float32_copy(tmp_path, load_model, monkeypatch):
    """klgap.measure on a bfloat16 model the caller holds: its float32 reference is its own weights cast up, made
    once for every site of a study, and each site's check is recorded."""
    import copy

    import klgap

    hf = copy.deepcopy(load_model("tiny-llama").hf_model).to(torch.bfloat16)
    casts: list[torch.dtype] = []
    monkeypatch.setattr(loading, "cast_copy", lambda model, dtype: casts.append(dtype) or CAST_COPY(model, dtype))
    template = _site_saes(tmp_path / "saes", STUDY)
    ids = torch.randint(0, 200, (8, 24), generator=torch.Generator().manual_seed(0))
    klgap.measure(hf, template, tokens=ids, site=["resid_pre", "mlp_out"], layer=1, batch_size=4,
                  interventions=["sae", "epsilon_random", "zero"], progress=False, out=tmp_path / "held")
    assert casts == [torch.float32]
    for path in ("resid_pre_L01", "mlp_out_L01"):
        report = load_report(tmp_path / "held" / path)
        assert report.dtype == "bfloat16" and report.precision.n_contexts == 2
        assert report.precision.n_tokens == 3 * 2 * 23 and report.precision.kl_abs_diff_max > 0
