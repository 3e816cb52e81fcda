"""The engine's numbers against hand computation with plain Hugging Face forwards and hooks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from klgap.forward import executors
from klgap.job import cells
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.plan.sites import hook_name
from tests.close import assert_identical_frames
from tests.helpers import random_sae, run_config, shrink_sae


def _run(tmp_path, name="run", **kw):
    cfg = RunConfig(**{"tokens": 4 * 32, "context_len": 32, "batch_size": 2, "device": "cpu", "dataset": "random", **kw})
    report = run_config(cfg, tmp_path / name, progress=False).model_dump(mode="json")
    return report, pd.read_parquet(tmp_path / name / "tokens.parquet")


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
def test_identity_patch_gives_zero_kl(tmp_path, load_model, model):
    lm = load_model(model)
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("resid_pre", 1))
    report, tokens = _run(tmp_path, model=model, sae=str(sae), interventions=["identity", "sae", "epsilon_random"])
    ident = tokens[tokens.intervention == "identity"]
    assert len(ident) == 4 * 31
    assert ident.kl.abs().max() < 1e-6
    assert np.nanmax(np.abs(ident.ce_delta)) < 1e-6
    assert report["interventions"]["sae"]["kl_mean"] > 1e-4  # a random SAE does change the output
    assert report["kl_ratio_sae_over_epsilon_random"] == pytest.approx(
        report["interventions"]["sae"]["kl_mean"] / report["interventions"]["epsilon_random"]["kl_mean"], rel=1e-6
    )


def test_shrink_only_sae(tmp_path, load_model):
    """x̂ = 0.5x: sae_norm_corrected restores x exactly (KL 0); at the last resid_post LayerNorm hides the norm."""
    lm = load_model("tiny-gpt2")
    last = lm.n_layers - 1
    sae = shrink_sae(tmp_path / "shrink.safetensors", lm.d_model, 0.5, hook_name("resid_post", last))
    report, tokens = _run(tmp_path, model="tiny-gpt2", sae=str(sae), interventions=["sae", "sae_norm", "sae_norm_corrected"])
    kl = report["interventions"]
    assert kl["sae_norm_corrected"]["kl_mean"] < 1e-6
    assert kl["sae_norm"]["kl_mean"] < 1e-5  # ln_f(0.5 x) == ln_f(x) up to its eps
    assert kl["sae"]["kl_mean"] == pytest.approx(kl["sae_norm"]["kl_mean"], abs=1e-7)
    assert tokens.cos.min() > 0.9999 and np.allclose(tokens.x_hat_norm, 0.5 * tokens.x_norm, rtol=1e-5)


def _hook_capture_and_patch(module, replacement=None, store=None):
    def hook(mod, args, out):
        tensor = out[0] if isinstance(out, tuple) else out
        if store is not None:
            store.append(tensor.detach().clone())
        if replacement is not None:
            patched = replacement(tensor)
            return (patched, *out[1:]) if isinstance(out, tuple) else patched
        return None

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["all_tokens", "single_token"])
def test_engine_kl_equals_plain_forward_with_hook(tmp_path, load_model, mode):
    """KL from the engine == KL from two plain HF forwards, the second with a hand-written hook."""
    from klgap.job.loading import load_sae

    lm = load_model("tiny-gpt2")
    sae_path = random_sae(tmp_path / "sae.safetensors", lm.d_model, 256, hook_name("mlp_out", 1), seed=3)
    extra = {"position": 5, "k": 4} if mode == "single_token" else {}
    report, tokens = _run(tmp_path, model="tiny-gpt2", sae=str(sae_path), interventions=["sae"], mode=mode, **extra)
    sae = load_sae(str(sae_path), torch.device("cpu"))
    contexts = cells.prepare(RunConfig(model="tiny-gpt2", sae=str(sae_path), tokens=128, context_len=32, dataset="random", device="cpu")).contexts
    mlp = lm.hf_model.transformer.h[1].mlp
    with torch.no_grad():
        clean = lm.hf_model(input_ids=contexts, use_cache=False).logits.float()

        def replace(x):
            x_hat = sae.decode(sae.encode(x.reshape(-1, x.shape[-1]))).reshape(x.shape)
            out = x.clone()
            if mode == "all_tokens":
                out[:, 1:] = x_hat[:, 1:]
            else:
                out[:, 5] = x_hat[:, 5]
            return out

        handle = _hook_capture_and_patch(mlp, replacement=replace)
        try:
            patched = lm.hf_model(input_ids=contexts, use_cache=False).logits.float()
        finally:
            handle.remove()
    kl = torch.nn.functional.kl_div(
        patched.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)  # [ctx pos]
    got = tokens[tokens.intervention == "sae"].sort_values(["context", "position"])
    positions = got.position.to_numpy().reshape(len(contexts), -1)[0].copy()
    expected = kl[:, torch.as_tensor(positions)].reshape(-1).numpy()
    np.testing.assert_allclose(got.kl.to_numpy(), expected, rtol=1e-4, atol=1e-6)
    nxt = contexts[:, positions + 1] if positions.max() + 1 < 32 else None
    if nxt is not None:
        ce = (-patched.log_softmax(-1)[:, positions].gather(-1, nxt[..., None]) + clean.log_softmax(-1)[:, positions].gather(-1, nxt[..., None]))[..., 0]
        np.testing.assert_allclose(got.ce_delta.to_numpy(), ce.reshape(-1).numpy(), rtol=1e-4, atol=1e-6)


def test_many_samples(tmp_path, load_model):
    lm = load_model("tiny-llama")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 256, hook_name("resid_pre", 1))
    report, tokens = _run(
        tmp_path, model="tiny-llama", sae=str(sae), mode="many_samples", position=10, n_samples=20, interventions=["sae"]
    )
    draws = tokens[tokens.draw >= 0]
    assert len(draws) == 4 * 20 and draws.draw.max() == 19
    assert draws.groupby("context").kl.std().min() > 0  # the draws differ
    ms = report["many_samples"]
    assert len(ms["per_context"]) == 4
    c0 = ms["per_context"][0]
    d0 = draws[draws.context == c0["context"]].kl
    assert c0["z"] == pytest.approx((c0["sae_kl"] - d0.mean()) / d0.std(ddof=1), rel=1e-6)


def test_same_seed_same_numbers_and_resume(tmp_path, load_model):
    lm = load_model("tiny-pythia")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("attn_out", 0))
    kw = dict(model="tiny-pythia", sae=str(sae), interventions=["sae", "epsilon_random", "theta_random"])
    first, t1 = _run(tmp_path, "a", **kw)
    second, t2 = _run(tmp_path, "b", **kw)
    assert_identical_frames(t1, t2)
    assert first["interventions"] == second["interventions"]
    # lose one finished batch: the same command recomputes only it and ends with the same numbers
    (tmp_path / "a" / "parts" / "batch_00001.json").unlink()
    third, t3 = _run(tmp_path, "a", **kw)
    assert_identical_frames(t1, t3)
    # a different config refuses to resume into the folder
    with pytest.raises(KlgapError, match="holds a different run"):
        _run(tmp_path, "a", **{**kw, "seed": 1})
    json.loads((tmp_path / "a" / "report.json").read_text())


def test_bad_inputs(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("mlp_out", 0))
    wide = random_sae(tmp_path / "wide.safetensors", lm.d_model + 1, 128, hook_name("mlp_out", 0))
    with pytest.raises(KlgapError, match=r"trained on blocks\.0\.hook_mlp_out.*--site attn_out"):
        _run(tmp_path, model="tiny-gpt2", sae=str(sae), site="attn_out", layer=0)
    with pytest.raises(KlgapError, match=r"d_in=65"):
        _run(tmp_path, model="tiny-gpt2", sae=str(wide))
    with pytest.raises(KlgapError, match=r"--layer 7 is out of range.*0\.\.1"):
        _run(tmp_path, model="tiny-gpt2", site="mlp_out", layer=7, sae=None)
    with pytest.raises(KlgapError, match=r"unknown intervention|unknown perturbation 'epsilon_randm'.*did you mean 'epsilon_random'"):
        _run(tmp_path, model="tiny-gpt2", sae=str(sae), interventions=["epsilon_randm"])


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
def test_suffix_replay_equals_full_forward(tmp_path, load_model, model, monkeypatch):
    """Rerunning only the layers above the site gives the same numbers as full forwards through nnsight, with
    the interventions stacked along the batch (the default on CUDA; here given a CPU budget)."""
    from klgap.plan.sites import SITES

    monkeypatch.setattr(executors, "STACK_BYTES_CPU", 1 << 30)

    lm = load_model(model)
    for site in SITES:
        for layer in (0, lm.n_layers - 1):
            sae = random_sae(tmp_path / f"{site}{layer}.safetensors", lm.site_widths[site], 128, hook_name(site, layer))
            kw = dict(model=model, sae=str(sae), interventions=["sae", "epsilon_random"], tokens=64)
            fast, t_fast = _run(tmp_path, f"fast-{site}{layer}", **kw)
            slow, t_slow = _run(tmp_path, f"slow-{site}{layer}", **kw, no_fast=True)
            assert fast["execution"]["path"] == "suffix-replay" and slow["execution"]["path"] == "full-forward"
            assert fast["execution"]["stack"] == 2  # both interventions in one pass, stacked along the batch
            np.testing.assert_allclose(t_fast.kl, t_slow.kl, rtol=1e-4, atol=1e-7, err_msg=f"{site} L{layer}")
            np.testing.assert_allclose(t_fast.ce_delta, t_slow.ce_delta, rtol=1e-4, atol=1e-6, err_msg=f"{site} L{layer}")


def test_stacking_follows_the_memory_budget(tmp_path, load_model, monkeypatch):
    """The number of interventions per suffix pass comes from the memory budget; stacked or not, the same numbers."""
    lm = load_model("tiny-llama")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("mlp_out", 0))
    kw = dict(model="tiny-llama", sae=str(sae), interventions=["sae", "sae_norm", "epsilon_random", "theta_random"], tokens=64)
    default, t_default = _run(tmp_path, "default", **kw)
    assert "stack" not in default["execution"]  # CPU: one intervention per pass unless given a budget
    monkeypatch.setattr(executors, "STACK_BYTES_CPU", 1 << 30)
    stacked, t_stacked = _run(tmp_path, "stacked", **kw)
    assert stacked["execution"]["stack"] == 4
    cfg = RunConfig(**{"tokens": 64, "context_len": 32, "batch_size": 2, "device": "cpu", "dataset": "random", **kw})
    per_copy = executors.STACK_BYTES_CPU // executors.stack_size(cfg, lm)  # what one copy costs
    monkeypatch.setattr(executors, "STACK_BYTES_CPU", 3 * per_copy)
    assert executors.stack_size(cfg, lm) == 3
    three, t_three = _run(tmp_path, "three", **kw)
    assert three["execution"]["stack"] == 3  # passes of 3 + 1
    monkeypatch.setattr(executors, "STACK_BYTES_CPU", 1)
    single, t_single = _run(tmp_path, "single", **kw)
    assert "stack" not in single["execution"]
    for table in (t_three, t_single, t_default):
        np.testing.assert_allclose(table.kl, t_stacked.kl, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(table.ce_delta, t_stacked.ce_delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "model,dtype", [("tiny-gpt2", "float32"), ("tiny-pythia", "float32"), ("tiny-llama", "float32"), ("tiny-pythia", "float64")]
)
@pytest.mark.parametrize("mode", ["single_token", "many_samples"])
def test_kv_cache_equals_full_forward(tmp_path, load_model, model, dtype, mode):
    """Reusing the keys/values of positions < t gives the numbers of full forwards through nnsight.

    float32: attention over the cached prefix sums in another order, so KL (~1e-4 here) differs by float32
    round-off of the log-probabilities (<= 1e-6 absolute); float64 shows the computation is the same."""
    from klgap.plan.sites import SITES

    lm = load_model(model)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-12}
    extra = {"position": 6, "k": 5, "dtype": dtype} if mode == "single_token" else {"position": 6, "n_samples": 7, "dtype": dtype}
    for n, site in enumerate(SITES):  # every site, alternating first and last layer
        for layer in [(0, lm.n_layers - 1)[n % 2]]:
            sae = random_sae(tmp_path / f"{site}{layer}.safetensors", lm.site_widths[site], 128, hook_name(site, layer))
            kw = dict(model=model, sae=str(sae), interventions=["sae", "epsilon_random"], tokens=96, mode=mode, **extra)
            fast, t_fast = _run(tmp_path, f"fast-{mode}-{site}{layer}", **kw)
            slow, t_slow = _run(tmp_path, f"slow-{mode}-{site}{layer}", **kw, no_fast=True)
            assert fast["execution"]["path"] == "kv-cache" and slow["execution"]["path"] == "full-forward"
            assert len(t_fast) == len(t_slow) > 0
            pd.testing.assert_frame_equal(t_fast.drop(columns=["kl", "ce_delta"]), t_slow.drop(columns=["kl", "ce_delta"]))
            np.testing.assert_allclose(t_fast.kl, t_slow.kl, **tol, err_msg=f"{site} L{layer}")
            np.testing.assert_allclose(t_fast.ce_delta, t_slow.ce_delta, **tol, err_msg=f"{site} L{layer}")
            assert t_fast.kl[t_fast.intervention == "sae"].max() > 1e-4  # the patch did something


def test_shared_clean_forward_gives_the_numbers_of_separate_runs(tmp_path, load_model):
    """A study over a list of SAEs (each at its own site and layer) shares each batch's clean forward; per-token
    numbers equal separate runs'."""
    import dataclasses

    from klgap.job.execute import run_job
    from klgap.job.plan import plan_job
    from klgap.report.read import load_report

    lm = load_model("tiny-llama")
    saes = []
    for site, layer in [("mlp_out", 1), ("resid_pre", 0), ("attn_out", 0), ("resid_post", 1)]:
        saes.append(str(random_sae(tmp_path / f"{site}{layer}.safetensors", lm.site_widths[site], 128,
                                   hook_name(site, layer))))
    base = RunConfig(model="tiny-llama", tokens=96, context_len=32, batch_size=2, device="cpu", dataset="random",
                     interventions=["sae", "epsilon_random", "sae_error_shuffled"])
    study = run_job(plan_job(base, saes=saes), tmp_path / "shared", progress=False)
    assert [run.path for run in study.runs] == ["mlp_out_L01", "resid_pre_L00", "attn_out_L00", "resid_post_L01"]
    for sae, row in zip(saes, study.runs, strict=True):
        out = tmp_path / "shared" / row.path
        report = load_report(out)
        alone = run_config(dataclasses.replace(base, sae=sae), tmp_path / f"alone-{row.path}", progress=False)
        assert report.execution["clean_forward"] == "shared by 4 sites/layers"
        assert_identical_frames(pd.read_parquet(out / "tokens.parquet"),
                                pd.read_parquet(tmp_path / f"alone-{row.path}" / "tokens.parquet"))
        assert report.interventions == alone.interventions
        assert report.interventions["sae"].kl_mean > 0


def test_parts_read_back_compact_and_joined_a_part_at_a_time(tmp_path, load_model):
    """The report reads the parts into one compact frame (categorical names, int32 ids) and tokens.parquet is
    the parts joined in order, with plain columns."""
    from klgap.job.folder import RunDir

    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("resid_pre", 1))
    _, tokens = _run(tmp_path, model="tiny-gpt2", sae=str(sae), interventions=["sae", "epsilon_random"])
    frame, sides = RunDir(tmp_path / "run").read_parts()
    assert len(sides) == 2 and len(frame) == len(tokens) == 2 * 4 * 31
    assert isinstance(frame["intervention"].dtype, pd.CategoricalDtype)
    assert list(frame["intervention"].cat.categories) == ["sae", "epsilon_random"]  # order of appearance
    assert frame["context"].dtype == np.int32 and frame["kl"].dtype == np.float32
    parts = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "run" / "parts").glob("*.parquet"))], ignore_index=True)
    assert_identical_frames(tokens, parts)
    pd.testing.assert_frame_equal(frame.astype({"intervention": str}), parts.astype(frame.dtypes.drop("intervention").to_dict()), check_dtype=False,
                                  check_exact=True)


def test_drop_last_position_keeps_the_patch_and_measures_one_position_less(tmp_path, load_model):
    """The study's protocol (error_eval.py: every position patched, ``[:, :-1]`` measured): the same numbers as
    the default run at every position but the last, which is left out; the report and run.json say so."""
    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("resid_pre", 1))
    kw = dict(model="tiny-gpt2", sae=str(sae), interventions=["sae", "epsilon_random", "mean_ablation"],
              mask_special="none")
    full, t_full = _run(tmp_path, "full", **kw)
    dropped, t_drop = _run(tmp_path, "dropped", drop_last_position=True, **kw)
    assert full["last_position"] == "measured" and dropped["last_position"] == "patched, not measured"
    assert dropped["config"]["drop_last_position"] is True
    assert json.loads((tmp_path / "dropped" / "run.json").read_text())["last_position"] == "patched, not measured"
    assert sorted(t_drop.position.unique()) == list(range(31))  # positions 0..30 of 32
    assert len(t_drop) == 3 * 4 * 31 and dropped["n_tokens"] == 4 * 31
    kept = t_full[t_full.position < 31].reset_index(drop=True)
    assert_identical_frames(t_drop[kept.columns].reset_index(drop=True), kept)
    assert not t_drop.ce_delta.isna().any()  # every measured position has a next token
    assert dropped["interventions"]["sae"]["kl_mean"] == pytest.approx(kept[kept.intervention == "sae"].kl.mean(), rel=1e-6)


def test_drop_last_position_is_checked_against_the_measured_positions():
    RunConfig(model="m", mode="single_token", position=32, k=16, context_len=49).validate()
    with pytest.raises(KlgapError, match=r"--drop-last-position: it needs context_len ≥ 50"):
        RunConfig(model="m", mode="single_token", position=32, k=16, context_len=49, drop_last_position=True).validate()
