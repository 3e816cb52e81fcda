"""The second-order (Fisher) account of a patch: KL(P || P') ≈ ½ δᵀFδ, computed through the layers above a site.

A patch δ = x' − x at a site moves the logits at every measured position s by ``v_s = (J δ)_s`` to first order
(J: the Jacobian of the measured logits with respect to the site's activations at the patched positions), and

    KL_s ≈ ½ v_sᵀ (diag p_s − p_s p_sᵀ) v_s = ½ (Σ_i p_i v_i² − (Σ_i p_i v_i)²)

(diag p − ppᵀ: the Fisher information of the softmax with respect to its logits; p the clean distribution).
:func:`quadratic_kl` is that formula, ``v`` one forward-mode JVP through :class:`SuffixMap` (the suffix replay's
layers, klgap/forward/suffix.py: the model's own Hugging Face modules, differentiated by torch.func).

The Fisher of the site (the matrix this module's sensitivity figures describe) is, per context c,

    F_c = Σ_{s measured} J_sᵀ (diag p_s − p_s p_sᵀ) J_s,        so that   Σ_s KL_s ≈ ½ δ_cᵀ F_c δ_c

with δ_c the context's patch at every patched position at once, an (npos·d)-vector: all-token mode patches every
kept position (F_c is (n·d) × (n·d)), single-token mode the position t (d × d). Contexts are independent, so F of
a batch is block-diagonal and one Fisher-vector product (:meth:`SuffixMap.fisher_product`: a JVP, then a VJP of
``(diag p − ppᵀ) v``) gives every context's at once; :func:`lanczos` finds each context's top eigenpairs from
them, all contexts together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from klgap.errors import KlgapError
from klgap.forward.suffix import SuffixRunner
from klgap.protocols import LoadedModel, SiteSpec


def quadratic_kl(p: Tensor, v: Tensor) -> Tensor:
    """½ vᵀ(diag p − ppᵀ)v per position: ``p, v [... vocab]`` -> ``[...]`` (in v's dtype, float32 at least)."""
    v = v if v.dtype == torch.float64 else v.float()
    p = p.to(v.dtype)
    mean = (p * v).sum(-1)
    return 0.5 * ((p * v * v).sum(-1) - mean * mean)


def fisher_apply(p: Tensor, v: Tensor) -> Tensor:
    """(diag p − ppᵀ) v per position: ``p, v [... vocab]`` -> ``[... vocab]``."""
    p = p.to(v.dtype)
    return p * (v - (p * v).sum(-1, keepdim=True))


@dataclass
class SuffixMap:
    """The measured logits as a function of the site's activations at the patched positions, for one batch.

    runner: a SuffixRunner that has run this batch's clean forward (it holds the site's clean value and the
    suffix blocks' calls); at: the patched positions (``slice``); start: the first measured position (the tails'
    start); p: the clean distribution ``[b n-start vocab]``; weight: ``[b n-start]`` 1 at the measured positions,
    0 elsewhere (masked tokens, a dropped last position), what the Fisher sums over."""

    runner: SuffixRunner
    at: slice
    start: int
    p: Tensor
    weight: Tensor
    _pullback: Any = field(default=None, repr=False)

    @property
    def x0(self) -> Tensor:
        """The clean activations at the patched positions ``[b npos d]``."""
        return self.runner.site_value[:, self.at]

    def logits(self, x: Tensor) -> Tensor:
        """``x [b npos d]`` -> the measured logits ``[b n-start vocab]`` (differentiable). Attention runs on SDPA's
        math kernel: the fused CPU and CUDA kernels have no forward-mode derivative."""
        with sdpa_kernel([SDPBackend.MATH]):
            return self.runner.replay(x.to(self.runner.site_value.dtype), self.at)[:, self.start :]

    def jvp(self, u: Tensor) -> Tensor:
        """J u: the first-order change of the measured logits for a patch ``u [b npos d]`` -> ``[b n-start vocab]``
        (forward mode, no graph kept)."""
        x0 = self.x0
        with torch.no_grad():  # forward-mode AD ignores no_grad; nothing is recorded for backward
            _, v = torch.func.jvp(self.logits, (x0,), (u.to(x0.dtype),))
        return v

    def predicted_kl(self, delta: Tensor) -> Tensor:
        """½ (Jδ)ᵀ(diag p − ppᵀ)(Jδ) at every measured position: ``delta [b npos d]`` -> ``[b n-start]``."""
        return quadratic_kl(self.p, self.jvp(delta))

    def quadratic_form(self, u: Tensor) -> Tensor:
        """uᵀ F_c u per context: ``u [b npos d]`` -> ``[b]`` (twice the predicted KL summed over measured positions)."""
        return 2.0 * (self.predicted_kl(u) * self.weight).sum(-1)

    def fisher_product(self, u: Tensor) -> Tensor:
        """F_c u_c for every context at once: ``u [b npos d]`` -> ``[b npos d]`` (a JVP, then a VJP)."""
        if self._pullback is None:  # one recorded replay serves every product of the batch
            _, self._pullback = torch.func.vjp(self.logits, self.x0)
        v = self.jvp(u)
        (out,) = self._pullback(fisher_apply(self.p, v) * self.weight.unsqueeze(-1).to(v.dtype))
        return out.detach()


def check_replayable(model: LoadedModel) -> None:
    """Raise the error that names a model family whose layers above a site cannot be replayed (no block layout)."""
    if not SuffixRunner.supported(model):
        family = getattr(getattr(model.hf_model, "config", None), "model_type", None) or model.name
        raise KlgapError(f"--second-order needs the layers above the site replayed, and the {family!r} family "
                         f"({model.name}) gives no block layout (LoadedModel.layout) or runs remotely; use a family "
                         "with one (gpt2, gpt_neox, llama, gemma2, ...) or leave out --second-order")


def clean_runner(model: LoadedModel, spec: SiteSpec, layer: int, ids: Tensor) -> SuffixRunner:
    """A suffix runner that has run the clean forward of ``ids [b n]`` (its site value and the blocks' calls)."""
    check_replayable(model)
    runner = SuffixRunner(model, spec, layer)
    runner.clean(ids)
    return runner


@dataclass(frozen=True)
class Eigen:
    """Each context's top-k Fisher eigenpairs: values ``[b k]`` (descending), vectors ``[b k N]`` (orthonormal) and
    residual norms ``‖F v − θ v‖`` ``[b k]``."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor


def lanczos(product: Any, b: int, dim: int, k: int, steps: int, generator: torch.Generator,
            dtype: torch.dtype, device: torch.device) -> Eigen:
    """Top-`k` eigenpairs of b symmetric PSD matrices at once from `steps` Lanczos steps with full
    reorthogonalization: ``product(Q [b dim]) -> [b dim]`` applies each context's matrix to its row. The residuals
    are exact (one more product), so a caller states how well each pair converged."""
    steps = max(k, min(steps, dim))
    basis = torch.zeros(steps + 1, b, dim, dtype=dtype, device=device)
    start = torch.randn(b, dim, generator=generator, dtype=dtype, device=device)
    basis[0] = start / start.norm(dim=-1, keepdim=True)
    alpha = torch.zeros(b, steps, dtype=dtype, device=device)
    beta = torch.zeros(b, steps, dtype=dtype, device=device)
    for j in range(steps):
        w = product(basis[j])
        alpha[:, j] = (w * basis[j]).sum(-1)
        for _ in range(2):  # full reorthogonalization, twice (Kahan's rule)
            w = w - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", basis[: j + 1], w), basis[: j + 1])
        norm = w.norm(dim=-1)
        scale = alpha[:, : j + 1].abs().amax(-1).clamp(min=torch.finfo(dtype).tiny)
        broke = norm <= 1e3 * torch.finfo(dtype).eps * scale  # an invariant subspace: go on with a fresh direction
        if bool(broke.any()):
            fresh = torch.randn(b, dim, generator=generator, dtype=dtype, device=device)
            for _ in range(2):
                fresh = fresh - torch.einsum("jb,jbd->bd", torch.einsum("jbd,bd->jb", basis[: j + 1], fresh),
                                             basis[: j + 1])
            w = torch.where(broke.unsqueeze(-1), fresh, w)
            norm = torch.where(broke, torch.zeros_like(norm), norm)
        beta[:, j] = norm
        basis[j + 1] = w / w.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    theta, s = torch.linalg.eigh(tri)  # ascending
    top = torch.arange(steps - 1, steps - 1 - k, -1, device=device)
    values = theta[:, top]  # [b k]
    vectors = torch.einsum("bjk,jbd->bkd", s[:, :, top], basis[:steps])  # [b k dim]
    applied = torch.stack([product(vectors[:, i]) for i in range(k)], 1)
    residuals = (applied - values.unsqueeze(-1) * vectors).norm(dim=-1)
    return Eigen(values, vectors, residuals)


__all__ = ["Eigen", "SuffixMap", "fisher_apply", "lanczos", "check_replayable", "clean_runner", "quadratic_kl"]
