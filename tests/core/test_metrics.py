"""The fused KL / ΔCE pass (metrics.CleanReference) against the textbook formulas, computed in float64."""

from __future__ import annotations

import re

import pytest
import torch

from klgap.forward import metrics


def textbook(z: torch.Tensor, z_patched: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = metrics.log_probs(z.double())
    return metrics.kl_per_token(logp, z_patched.double()), metrics.ce_delta_per_token(logp, z_patched.double(), next_ids)


def logits_pair(scale: float, dtype: torch.dtype, vocab: int = 3000, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(3, 7, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    z_patched = (z.double() + scale * torch.randn(3, 7, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    next_ids = torch.randint(0, vocab, (3, 7), generator=gen)
    next_ids[:, -1] = -1
    return z, z_patched, next_ids


@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 30.0])
def test_fused_equals_textbook_in_float64(scale):
    z, z_patched, next_ids = logits_pair(scale, torch.float64)
    kl_ref, ce_ref = textbook(z, z_patched, next_ids)
    kl, ce = metrics.CleanReference.of(z).measure(z_patched.clone(), next_ids)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, kl_ref, rtol=1e-9, atol=1e-14)  # atol: the textbook's own round-off
    torch.testing.assert_close(ce[:, :-1], ce_ref[:, :-1], rtol=1e-9, atol=1e-12)
    assert ce[:, -1].isnan().all()  # no next token at the last position


@pytest.mark.parametrize("scale", [1e-2, 1.0, 30.0])
def test_float32_close_to_float64(scale):
    z, z_patched, next_ids = logits_pair(scale, torch.float32)
    kl_ref, ce_ref = textbook(z, z_patched, next_ids)
    kl, ce = metrics.CleanReference.of(z).measure(z_patched.clone(), next_ids)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ce[:, :-1].double(), ce_ref[:, :-1], rtol=1e-4, atol=1e-4)


def test_tiny_kl_keeps_its_precision_in_float32():
    """KL ~ 1e-9 (a substitute at cosine ~1): the textbook float32 difference of log-probabilities is noise
    there, the fused pass computes it from the logit change itself."""
    z, z_patched, next_ids = logits_pair(1e-4, torch.float32)
    kl_ref, _ = textbook(z, z_patched, next_ids)
    assert kl_ref.max() < 1e-7
    kl, _ = metrics.CleanReference.of(z).measure(z_patched.clone(), next_ids)
    rel = ((kl.double() - kl_ref) / kl_ref).abs().max()
    assert rel < 0.1
    naive = metrics.kl_per_token(metrics.log_probs(z), z_patched)
    assert ((naive.double() - kl_ref) / kl_ref).abs().max() > 1.0  # what the fused pass avoids


def test_huge_logit_changes_take_the_shifted_path():
    """max(d − E_P d) beyond exp's range: those rows use a max-shifted log-sum-exp; other rows do not change."""
    z, z_patched, next_ids = logits_pair(0.5, torch.float64)
    z_patched[1, 2, 5] += 500.0
    kl_ref, ce_ref = textbook(z, z_patched, next_ids)
    kl, ce = metrics.CleanReference.of(z).measure(z_patched.clone(), next_ids)
    assert kl[1, 2] > 100
    torch.testing.assert_close(kl, kl_ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(ce[:, :-1], ce_ref[:, :-1], rtol=1e-9, atol=1e-9)


def test_infinite_logits_fall_back_to_the_textbook_formula():
    z, z_patched, next_ids = logits_pair(0.1, torch.float32)
    z_patched[0, 0, 7] = float("-inf")  # a token with P > 0 that the patched run forbids: KL = inf
    kl, _ = metrics.CleanReference.of(z).measure(z_patched.clone(), next_ids)
    assert kl[0, 0] == float("inf")
    kl_ref, _ = textbook(z, z_patched, next_ids)
    torch.testing.assert_close(kl[1:].double(), kl_ref[1:], rtol=1e-4, atol=1e-7)

    masked = z.clone()
    masked[..., :10] = float("-inf")  # a vocabulary mask in both runs: those tokens contribute nothing
    masked_patched = z_patched.clone()
    masked_patched[..., :10] = float("-inf")
    kl, _ = metrics.CleanReference.of(masked).measure(masked_patched.clone(), next_ids)
    assert torch.isfinite(kl).all()
    kl_ref, _ = textbook(masked, masked_patched, next_ids)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-4, atol=1e-6)


def test_half_precision_logits_are_measured_in_float32():
    z, z_patched, next_ids = logits_pair(1.0, torch.float32)
    kl, _ = metrics.CleanReference.of(z.bfloat16()).measure(z_patched.bfloat16(), next_ids)
    assert kl.dtype == torch.float32
    kl_ref, _ = textbook(z.bfloat16().float(), z_patched.bfloat16().float(), next_ids)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-4, atol=1e-6)


def test_select_rows_and_positions():
    z, z_patched, next_ids = logits_pair(1.0, torch.float64)
    ref = metrics.CleanReference.of(z)
    rows = torch.tensor([2, 0, 2])
    kl, _ = ref.select(rows, slice(3, 5)).measure(z_patched[rows][:, 3:5].clone(), next_ids[rows][:, 3:5])
    full, _ = ref.measure(z_patched.clone(), next_ids)
    torch.testing.assert_close(kl, full[rows][:, 3:5], rtol=1e-12, atol=0)


def test_clean_logits_masked_to_minus_inf_are_still_measured():
    from klgap.errors import KlgapError

    z = torch.randn(2, 3, 50)
    z[..., :5] = float("-inf")
    kl, _ = metrics.CleanReference.of(z).measure(z.clone(), torch.zeros(2, 3, dtype=torch.long))
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)
    for bad, words in ((float("nan"), "1 NaN"), (float("inf"), "1 +inf")):
        broken = z.clone()
        broken[1, 2, 7] = bad
        with pytest.raises(KlgapError, match=re.escape(words)):
            metrics.CleanReference.of(broken)
    dead = z.clone()
    dead[0, 1] = float("-inf")
    with pytest.raises(KlgapError, match="every logit is -inf"):
        metrics.CleanReference.of(dead)
