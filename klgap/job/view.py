"""The SAE's view of a batch's tokens (x, x̂, per-token geometry, the substitutes) and the key of every random draw.

Every random draw of a job comes from a generator seeded by :func:`draw_key`: the job's seed, the batch, a stable
hash of the intervention's name with its parameters (``cosine_matched(cos=0.8,norm_frac=0.9)``), the stream (0: the
intervention's one draw per token; c + 1: context c's many-samples draws) and the site's index within a joint cell
(0 for its lowest site, and for a site measured alone). So an intervention draws the same numbers whatever else
``--interventions`` lists and in whatever order, on every resume, shard and rank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.plugins.capabilities import error_norm_predictor, without_skip
from klgap.protocols import ErrorSplitter, LoadedSAE, Perturbation


def name_key(name: str) -> int:
    """A stable 64-bit integer of an intervention's name (the first 8 bytes of its SHA-256; never Python's
    ``hash``, which changes per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def draw_key(seed: int, batch: int, intervention: str, *, context: int | None = None, site: int = 0) -> tuple[int, ...]:
    """The key of one stream of draws: (seed, batch, name_key(intervention), stream, site), where `intervention`
    is the intervention's recorded name (its parameters included), stream is 0 for its one draw per token and
    context + 1 for a many-samples context's draws, and site the index of a joint cell's site (0 for its lowest,
    whose draws are those of the same site measured alone)."""
    return (seed, batch, name_key(intervention), 0 if context is None else context + 1, site)


def draw_generator(device: torch.device, seed: int, batch: int, intervention: str, *, context: int | None = None,
                   site: int = 0) -> torch.Generator:
    """The generator of one stream of draws (:func:`draw_key`)."""
    return generator_for(device, *draw_key(seed, batch, intervention, context=context, site=site))


def generator_for(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded from a key of non-negative integers (:func:`draw_key`): the same numbers on resume."""
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


#: a batch with at least this many measured rows gets its principal components (anisotropy_sides); fewer (a
#: single-token batch: one row per context) give too noisy an estimate of them
PCA_MIN_ROWS = 256
#: the top principal components removed are the fewest that explain at least this share of a batch's variance (and,
#: separately, the first alone)
PCA_SHARE = 0.5


def anisotropy_sides(x: Tensor, err: Tensor) -> dict[str, Any]:
    """Side sums of the activations' anisotropy over one batch's rows (``x, err: [n d]`` float64; err = x − x̂):
    the eigenvalues of the batch's scatter Σ (x − x̄_B)(x − x̄_B)ᵀ (their sum, the first, and the top k's, k the fewest
    explaining PCA_SHARE of it), and Σ‖Vᵀe‖² of the error on the first and on those k eigenvectors
    (klgap/report/anisotropy.py). Empty under PCA_MIN_ROWS rows."""
    if len(x) < PCA_MIN_ROWS:
        return {}
    centred = x - x.mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    total = values.sum()
    k = int(torch.searchsorted(torch.cumsum(values, 0), PCA_SHARE * total).item()) + 1 if total > 0 else 1
    k = min(k, len(values))
    on_top = (err @ vectors[:, :k]) ** 2  # [n k]
    return {"pca_n": len(x), "pca_scatter": float(total), "pca_top1": float(values[0]),
            "pca_topk": float(values[:k].sum()), "pca_k": k, "pca_err_top1": float(on_top[:, 0].sum()),
            "pca_err_topk": float(on_top.sum())}


@dataclass
class SaeView:
    """The SAE's view of a set of tokens: x (possibly centred), x̂ and per-token geometry.

    For a substitute that reads another site than it writes (a transcoder: mlp_in -> mlp_out) x is the written
    site's clean activation and x̂ the substitute's output from the read site's (``reads``); every perturbation
    then works around the true x with the substitute's error, as for an SAE."""

    x: Tensor  # [n d] float32
    x_hat: Tensor  # [n d] float32
    offset: Tensor  # [n 1] float32: added back before patching (the mean when centring, else 0)
    stats: dict[str, Tensor]  # eps, cos, x_norm, x_hat_norm, l0: [n] each

    parts: tuple[Tensor, Tensor] | None = None  # (e_lin, e_nl) [n d] each, when the run splits the SAE's error
    skip: Tensor | None = None  # [n d] a skip transcoder's skip term (part of x_hat), else None
    err_sq_pred: Tensor | None = None  # [n]: the splitter's ‖e‖² predicted from x (klgap.protocols.ErrorNormPredictor)

    @classmethod
    def of(cls, acts: Tensor, sae: LoadedSAE, center: bool, split: ErrorSplitter | None = None,
           reads: Tensor | None = None) -> SaeView:
        """The view of ``acts: [n d]``; with `split` (klgap.protocols.ErrorSplitter) the stats also hold eps_lin and
        eps_nl, the norms of the linear and nonlinear parts of the error. `reads` ``[n d_in]``: the read site's
        activations of the same tokens, for a substitute that reads another site (LoadedSAE.reads)."""
        x = acts.float()
        offset = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[:, :1])
        x = x - offset
        if sae.transcoder and reads is None:
            raise ValueError(f"the transcoder {sae.source!r} reads {sae.reads}: its view needs those activations")
        x_hat, feats, skip = sae.reconstruct(x if reads is None else reads.float().to(x.device))
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        stats = {
            "eps": (x - x_hat).norm(dim=-1),
            "cos": cos,
            "x_norm": x_norm,
            "x_hat_norm": x_hat_norm,
            "l0": (feats != 0).sum(-1).float(),
        }
        parts, err_sq_pred = None, None
        if split is not None:
            parts = split.error_parts(x, x_hat)
            stats["eps_lin"], stats["eps_nl"] = parts[0].norm(dim=-1), parts[1].norm(dim=-1)
            if (predictor := error_norm_predictor(split)) is not None:
                err_sq_pred = predictor.predict_error_sq(x)
        return cls(x, x_hat, offset, stats, parts, skip=skip, err_sq_pred=err_sq_pred)

    def substitute(self, perturbation: Perturbation, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """x' of `perturbation` (a skip-free one, :class:`klgap.protocols.SkipFreePerturbation`, is handed x̂
        without the skip term) plus the offset, in `dtype`."""
        x_hat = self.x_hat
        if without_skip(perturbation):
            if self.skip is None:
                raise KlgapError(f"intervention {perturbation.name!r} measures a skip transcoder without its skip "
                                 "term, but the substitute has no skip term (W_skip)")
            x_hat = x_hat - self.skip
        x_prime = perturbation(self.x, x_hat, generator)
        return (x_prime.float() + self.offset).to(dtype)

    def side_stats(self, measured: Tensor | None = None) -> dict[str, Any]:
        """Sums for explained variance over the whole run: n, Σx, Σ‖x‖², Σ‖x − x̂‖², and Σᵢ (1 − ‖xᵢ − x̂ᵢ‖² /
        ‖xᵢ − x̄_B‖²) with x̄_B the mean of these rows (sae_lens's legacy explained variance, per batch; schema 0.7.0)
        (over the `measured` rows ``[n] bool`` only, when given)."""
        finite = torch.isfinite(self.x).all(-1) & torch.isfinite(self.x_hat).all(-1)
        if measured is not None:
            finite &= measured.to(finite.device)
        x, err = self.x[finite].double(), (self.x - self.x_hat)[finite].double()
        sides = {
            "n": int(finite.sum()),
            "n_nonfinite_acts": int((~finite).sum()),
            "sum_x": x.sum(0).cpu().tolist(),
            "sum_sq_x": float((x**2).sum()),
            "sum_sq_err": float((err**2).sum()),
            "sum_ev_legacy": float((1 - (err**2).sum(-1) / ((x - x.mean(0)) ** 2).sum(-1)).sum()) if len(x) else 0.0,
        }
        sides |= anisotropy_sides(x, err)
        if self.parts is not None:  # the R²s of the error's linear part (klgap/report/decomposition.py)
            e_nl = self.parts[1][finite].double()
            sides |= {"sum_err": err.sum(0).cpu().tolist(), "sum_err_nl": e_nl.sum(0).cpu().tolist(),
                      "sum_sq_err_nl": float((e_nl**2).sum()),
                      "sum_sq_err_dims": (err**2).sum(0).cpu().tolist(),  # [d]: per dimension (Engels's R²)
                      "sum_sq_err_nl_dims": (e_nl**2).sum(0).cpu().tolist()}
        if self.err_sq_pred is not None:  # ‖e‖² against its prediction from x (Engels's "most of the norm")
            sq = (err**2).sum(-1)
            resid = sq - self.err_sq_pred[finite].double()
            sides |= {"sum_err_sq_sq": float((sq**2).sum()),
                      "sum_err_sq_resid_sq": float((resid**2).sum())}
        return sides


__all__ = ["PCA_MIN_ROWS", "PCA_SHARE", "SaeView", "anisotropy_sides", "draw_generator", "draw_key", "generator_for",
           "name_key"]
