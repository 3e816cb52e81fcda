"""--second-order: each intervention's predicted KL beside its measured one, and the site's Fisher sensitivity.

Per batch of a single-site cell (all_tokens or single_token mode), with a suffix runner of the batch's clean
forward (klgap/forward/fisher.py: one extra clean forward, whatever executor measured the batch):

- :func:`predicted_columns`: for each intervention its actual δ = x' − x at the positions it replaced (the same
  draws its patched run used) and ½ (Jδ)ᵀ(diag p − ppᵀ)(Jδ) at every measured position (one JVP), the rows'
  ``kl_second_order`` column, in the order and selection of the ``kl`` column.
- :func:`sensitivity_sums`: per context c, with F_c the Fisher of the context's measured next-token distributions
  with respect to the site's activations at every patched position (klgap/forward/fisher.py; N_c = patched
  positions × d coordinates): a Hutchinson estimate of tr F_c (:data:`PROBES` Rademacher probes), the same with
  covariance-shaped probes (the centred activations of random tokens of the batch: E zzᵀ = Σ_x), the SAE error
  ε = x̂ − x's δᵀF_cδ and ‖δ‖², and F_c's top :data:`TOP_K` eigenpairs (:data:`LANCZOS_STEPS` Lanczos steps on
  Fisher-vector products, all contexts at once) with the SAE error's energy in their span. The report
  (klgap/report/second_order.py) turns these sums into ratios of means over contexts with bootstrap intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from klgap.forward.fisher import SuffixMap, clean_runner, lanczos
from klgap.forward.suffix import SuffixRunner
from klgap.job.batch import Batch, Clean
from klgap.job.loaded import LoadedCell
from klgap.job.patch import SitePatch
from klgap.job.view import SaeView, generator_for

PROBES = 4  # Hutchinson probes per context, of each kind (Rademacher; covariance-shaped)
TOP_K = 8  # F_c's top eigendirections the SAE error's energy is measured in
LANCZOS_STEPS = 32  # Lanczos steps per batch (at most N_c): 2 suffix passes each, plus TOP_K for the residuals
TOLERANCE = 1e-2  # a top pair counts as converged when ‖F v − θ v‖ ≤ TOLERANCE · θ_1
FISHER_STREAM = 2**31  # the draw stream of the probes and the Lanczos start (apart from any intervention's)


def runner_for(cell: LoadedCell, batch: Batch) -> SuffixRunner:
    """The batch's clean suffix runner for the cell's (single) site."""
    run = cell.lowest
    return clean_runner(run.model, run.spec, run.layer, batch.ids)


def as_slice(at: slice | int) -> slice:
    return at if isinstance(at, slice) else slice(at, at + 1)


def predicted_columns(patch: SitePatch, runner: SuffixRunner, clean: Clean, start: int, weight: Tensor,
                      keep: Tensor | None) -> list[np.ndarray]:
    """Each intervention's ``kl_second_order`` (the ``kl`` column's dtype, the rows of its ``kl``: `keep` ``[b n-start]`` bool of the
    tail, all when None), from its own δ = x' − x at the positions it replaced."""
    out = []
    for j, intervention in enumerate(patch.interventions):
        [x_prime], at = patch.substitutes([(j, intervention)])
        where = as_slice(at)
        x0 = runner.site_value[:, where]
        delta = x_prime.reshape(x0.shape).float() - x0.float()
        predicted = SuffixMap(runner, where, start, clean.ref.p, weight).predicted_kl(delta)  # [b n-start]
        predicted = predicted.reshape(-1) if keep is None else predicted[keep.to(predicted.device)]
        out.append(predicted.to(clean.ref.z.dtype).cpu().numpy())  # the kl column's dtype
    return out


def sae_error(view: SaeView, rows: Tensor) -> Tensor:
    """The SAE's error x̂ − x (the offset cancels) placed at the patched tokens: `view` holds them in the row-major
    order of `rows` ``[b npos] bool``; ``[b npos d]`` float32, zeros elsewhere."""
    error = view.x_hat - view.x
    out = torch.zeros(*rows.shape, error.shape[-1], dtype=error.dtype, device=error.device)
    out[rows.to(error.device)] = error
    return out


def sensitivity_sums(runner: SuffixRunner, error: Tensor, rows: Tensor, at: slice, start: int, clean: Clean,
                     weight: Tensor, contexts: Tensor, seed: int, index: int) -> dict[str, Any]:
    """The side sums of the batch's Fisher sensitivity, one entry per context (see the module's docstring).

    error: the SAE's error at the patched positions ``[b npos d]`` (:func:`sae_error`); rows ``[b npos] bool``: the
    positions `at` of the tail's contexts that are patched; weight ``[b n-start]``: the measured positions;
    contexts ``[b]`` their ids. Contexts with nothing patched or measured are left out."""
    x0 = runner.site_value[:, at]  # [b npos d]
    b, npos, d = x0.shape
    device, work = x0.device, torch.float64 if x0.dtype == torch.float64 else torch.float32
    rows = rows.to(device)
    mask = rows.unsqueeze(-1).to(work)  # [b npos 1]
    smap = SuffixMap(runner, at, start, clean.ref.p, weight)
    generator = generator_for(device, seed, index, FISHER_STREAM)
    n_coords = rows.sum(-1).to(torch.float64) * d  # [b]

    tr_f = torch.zeros(b, dtype=torch.float64, device=device)
    cov_num, cov_den = torch.zeros_like(tr_f), torch.zeros_like(tr_f)
    tokens = x0[rows].to(work)  # [m d]
    centred = tokens - tokens.mean(0)
    for _ in range(PROBES):
        sign = torch.randint(0, 2, (b, npos, d), generator=generator, device=device).to(work) * 2 - 1
        tr_f += smap.quadratic_form(sign * mask).double()
        donor = torch.randint(0, len(centred), (b, npos), generator=generator, device=device)
        shaped = centred[donor] * mask
        cov_num += smap.quadratic_form(shaped).double()
        cov_den += (shaped.double() ** 2).sum((1, 2))
    error = error.to(device=device, dtype=work) * mask
    sae_num = smap.quadratic_form(error).double()
    sae_den = (error.double() ** 2).sum((1, 2))

    dim = npos * d
    flat_mask = mask.expand(b, npos, d).reshape(b, dim)

    def product(q: Tensor) -> Tensor:
        return (smap.fisher_product(q.reshape(b, npos, d) * mask).reshape(b, dim) * flat_mask).to(q.dtype)

    k = min(TOP_K, dim)
    eigen = lanczos(product, b, dim, k, LANCZOS_STEPS, generator, torch.float64, device)
    flat_error = error.reshape(b, dim).double()
    top_num = (torch.einsum("bkd,bd->bk", eigen.vectors, flat_error) ** 2).sum(-1)
    converged = (eigen.residuals <= TOLERANCE * eigen.values[:, :1].abs()).sum(-1)
    ok = (n_coords > 0) & (weight.sum(-1).to(device) > 0)
    pick = ok.cpu()

    def listed(values: Tensor) -> list[Any]:
        return values.detach().cpu()[pick].tolist()

    return {"fisher": {
        "context": contexts[pick].tolist(), "n_coords": listed(n_coords), "tr_f": listed(tr_f / PROBES),
        "cov_num": listed(cov_num / PROBES), "cov_den": listed(cov_den / PROBES), "sae_num": listed(sae_num),
        "sae_den": listed(sae_den), "top_num": listed(top_num), "top_values": listed(eigen.values),
        "converged": listed(converged), "probes": PROBES, "top_k": k, "lanczos_steps": min(LANCZOS_STEPS, dim),
        "tolerance": TOLERANCE}}


__all__ = ["LANCZOS_STEPS", "PROBES", "TOLERANCE", "TOP_K", "predicted_columns", "runner_for", "sae_error",
           "sensitivity_sums"]
