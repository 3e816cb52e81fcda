"""The activations' anisotropy and the explained variance without their top principal components
(klgap/job/view.py: anisotropy_sides, klgap/report/anisotropy.py, klgap/report/quality.py), against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klgap.job.view import PCA_MIN_ROWS, SaeView
from klgap.report import anisotropy
from klgap.report.quality import SaeQuality


def anisotropic(rng, n: int, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Activations with a mean offset of norm 10 and one direction of standard deviation 8 (the rest 1), and an
    x̂ that gets that direction exactly and half of every other one."""
    x = rng.normal(size=(n, d))
    x[:, 0] *= 8.0
    x += 10.0 * np.eye(d)[1]
    x_hat = x.copy()
    x_hat[:, 1:] = 10.0 * np.eye(d)[1, 1:] + 0.5 * (x[:, 1:] - 10.0 * np.eye(d)[1, 1:])
    return x, x_hat


def sides_of(x: np.ndarray, x_hat: np.ndarray, batch: int) -> list[dict]:
    out = []
    for start in range(0, len(x), batch):
        view = SaeView(torch.from_numpy(x[start:start + batch]).float(), torch.from_numpy(x_hat[start:start + batch]).float(),
                       torch.zeros(1), {})
        out.append(view.side_stats())
    return out


def numpy_ev_without(x: np.ndarray, x_hat: np.ndarray, batch: int, k_of) -> float:
    """Per batch: the eigenvectors of the centred scatter, the top k(values) removed from x − x̄_B and from e; pooled."""
    x, x_hat = x.astype(np.float32).astype(np.float64), x_hat.astype(np.float32).astype(np.float64)
    num = den = 0.0
    for start in range(0, len(x), batch):
        xb, eb = x[start:start + batch], x[start:start + batch] - x_hat[start:start + batch]
        xc = xb - xb.mean(0)
        values, vectors = np.linalg.eigh(xc.T @ xc)
        values, vectors = values[::-1], vectors[:, ::-1]
        rest = vectors[:, k_of(values):]
        num += ((eb @ rest) ** 2).sum()
        den += ((xc @ rest) ** 2).sum()
    return 1 - num / den


def test_anisotropy_numbers_equal_numpy_on_synthetic_activations():
    rng = np.random.default_rng(0)
    n, batch = 4 * 512, 512
    x, x_hat = anisotropic(rng, n)
    sides = sides_of(x, x_hat, batch)
    x64 = x.astype(np.float32).astype(np.float64)
    mean = x64.mean(0)
    assert anisotropy.mean_offset_share(sides) == pytest.approx(mean @ mean / (x64**2).sum(1).mean(), rel=1e-9)
    assert anisotropy.mean_offset_share(sides) == pytest.approx(100 / (100 + 64 + 15), rel=0.05)  # known answer
    assert anisotropy.top_pc_share(sides) == pytest.approx(64 / (64 + 15), rel=0.05)
    # the first principal component is the direction x̂ gets exactly: without it x̂ explains 1 − 0.5² = 0.75
    assert anisotropy.ev_without_top_pcs(sides, "top1") == pytest.approx(
        numpy_ev_without(x, x_hat, batch, lambda v: 1), rel=1e-9)
    assert anisotropy.ev_without_top_pcs(sides, "top1") == pytest.approx(0.75, abs=0.005)  # the PCs are estimates
    half = lambda v: int(np.searchsorted(np.cumsum(v), 0.5 * v.sum())) + 1  # noqa: E731
    assert anisotropy.pcs_removed(sides) == (1, 1)  # 64 of 79 is over half
    assert anisotropy.ev_without_top_pcs(sides, "topk") == pytest.approx(
        numpy_ev_without(x, x_hat, batch, half), rel=1e-9)
    # pooled over every direction the EV is mostly the first one's: 1 − 15·0.25 / 79
    ev = 1 - ((x64 - x_hat) ** 2).sum() / ((x64 - mean) ** 2).sum()
    assert ev == pytest.approx(1 - 15 * 0.25 / 79, rel=0.02)

    quality = SaeQuality(explained_variance=ev, l0_mean=4.0, d_in=16,
                         mean_offset_share=anisotropy.mean_offset_share(sides), top_pc_share=anisotropy.top_pc_share(sides),
                         ev_top_pc_removed=anisotropy.ev_without_top_pcs(sides, "top1"),
                         ev_top_pcs_removed=anisotropy.ev_without_top_pcs(sides, "topk"), top_pcs_removed=(1, 1))
    assert quality.anisotropic
    assert "without it, " in quality.clause() and "without the top 1 (half the variance)" in quality.clause()
    assert "mean offset 0.5" in quality.clause()


def test_isotropic_activations_and_small_batches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1024, 16))
    x_hat = 0.5 * x
    sides = sides_of(x, x_hat, 512)
    assert anisotropy.mean_offset_share(sides) < 0.01 and anisotropy.top_pc_share(sides) < 0.15
    k_low, k_high = anisotropy.pcs_removed(sides)
    assert 6 <= k_low <= k_high <= 9  # about half of 16 equal directions
    assert anisotropy.ev_without_top_pcs(sides, "topk") == pytest.approx(0.75, abs=0.01)
    quality = SaeQuality(explained_variance=0.75, l0_mean=4.0, d_in=16,
                         mean_offset_share=anisotropy.mean_offset_share(sides), top_pc_share=anisotropy.top_pc_share(sides))
    assert not quality.anisotropic and "mean offset" not in quality.clause()
    small = sides_of(x[: PCA_MIN_ROWS - 1], x_hat[: PCA_MIN_ROWS - 1], PCA_MIN_ROWS - 1)  # a single-token batch's size
    assert anisotropy.top_pc_share(small) is None and anisotropy.ev_without_top_pcs(small, "top1") is None
    assert anisotropy.pcs_removed(small) is None and anisotropy.mean_offset_share(small) is not None


def test_a_run_reports_them_from_its_own_activations(tmp_path, load_model):
    """An all-token run whose batches hold ≥ PCA_MIN_ROWS tokens: sae_metrics carries the numbers, equal to numpy
    on the run's activations and the SAE's reconstruction of them, batch by batch."""
    from klgap.forward import activations
    from klgap.job import cells
    from klgap.plan.config import RunConfig
    from klgap.plan.sites import hook_name
    from tests.helpers import random_sae, run_config

    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp_path / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("resid_pre", 1), seed=2)
    cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=32 * 32, context_len=32, batch_size=16, device="cpu",
                    dataset="random", interventions=["sae", "epsilon_random"])
    metrics = run_config(cfg, tmp_path / "run", progress=False).sae_metrics
    loaded = cells.prepare(cfg)
    xs, hats = [], []
    for start in range(0, len(loaded.contexts), 16):
        x = activations.collect(loaded.model, loaded.spec, loaded.contexts[start:start + 16])[:, 1:].reshape(-1, lm.d_model)
        view = SaeView.of(x, loaded.sae, loaded.center)
        xs.append(view.x.double().numpy())
        hats.append(view.x_hat.double().numpy())
    x, x_hat = np.concatenate(xs), np.concatenate(hats)
    assert len(xs) == 2 and len(xs[0]) == 16 * 31 >= PCA_MIN_ROWS
    mean = x.mean(0)
    assert metrics.mean_offset_share == pytest.approx(mean @ mean / (x**2).sum(1).mean(), rel=1e-6)
    assert metrics.explained_variance_top_pc_removed == pytest.approx(
        numpy_ev_without(x, x_hat, 16 * 31, lambda v: 1), rel=1e-5)
    half = lambda v: int(np.searchsorted(np.cumsum(v), 0.5 * v.sum())) + 1  # noqa: E731
    assert metrics.explained_variance_top_pcs_removed == pytest.approx(numpy_ev_without(x, x_hat, 16 * 31, half), rel=1e-5)
    ks = [half(np.linalg.eigvalsh((b - b.mean(0)).T @ (b - b.mean(0)))[::-1]) for b in xs]
    assert (metrics.top_pcs_removed_min, metrics.top_pcs_removed_max) == (min(ks), max(ks))
