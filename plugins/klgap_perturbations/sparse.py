"""A random dictionary and orthogonal matching pursuit: the sparse coder behind ``random_dictionary``.

OMP (Pati et al. 1993) codes each row of ``x`` with ``n_atoms`` atoms of a unit-norm dictionary: at every step it
adds the atom most correlated (in absolute value) with the current residual, never one already chosen, and the
reconstruction is the least-squares fit of x on every atom chosen so far, so the residual stays orthogonal to them.
Here the least squares is kept as an orthonormal basis of the chosen atoms (Gram-Schmidt, each new atom
orthogonalised twice against the basis: "twice is enough" in float32), so every step is a few batched products and
no per-row solve: the residual loses its component along the new basis vector. Rows are coded in chunks of CHUNK; the
cost per chunk is ``n_atoms`` products ``[CHUNK d] @ [d m]`` plus ``O(CHUNK · n_atoms · d)`` per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 512  # rows coded at once (memory: CHUNK × n_atoms × d floats for the basis of the chosen atoms)


def random_unit_dictionary(n_atoms: int, d: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """``[n_atoms d]`` float32 rows uniform on the unit sphere (normalised Gaussians), drawn on the CPU from `seed`
    (the same dictionary on every device), then moved to `device`."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_atoms, d, generator=gen, dtype=torch.float32)
    return (rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).to(device)


@torch.no_grad()
def omp(x: Tensor, dictionary: Tensor, n_atoms: int) -> Tensor:
    """``x: [n d]`` coded by orthogonal matching pursuit with `n_atoms` atoms of ``dictionary: [m d]`` (unit rows)
    per row; returns the reconstruction ``[n d]`` in float32 (zero rows stay zero)."""
    if dictionary.dim() != 2 or x.dim() != 2 or dictionary.shape[1] != x.shape[1]:
        raise ValueError(f"omp needs x [n d] and a dictionary [m d], got {tuple(x.shape)} and {tuple(dictionary.shape)}")
    if not 1 <= n_atoms <= min(dictionary.shape):
        raise ValueError(f"omp: n_atoms={n_atoms} must be in [1, min(m, d) = {min(dictionary.shape)}]")
    x = x.float()
    dictionary = dictionary.to(device=x.device, dtype=torch.float32)
    return torch.cat([_omp_rows(x[s:s + CHUNK], dictionary, n_atoms) for s in range(0, x.shape[0], CHUNK)]) \
        if x.shape[0] else x.clone()


def _omp_rows(x: Tensor, dictionary: Tensor, n_atoms: int) -> Tensor:
    n, d = x.shape
    chosen = torch.full((n, n_atoms), -1, dtype=torch.long, device=x.device)  # [n L]: -1 not chosen yet
    basis = torch.zeros(n, n_atoms, d, dtype=x.dtype, device=x.device)  # [n L d]: orthonormal rows (0 unused)
    residual = x.clone()
    for k in range(n_atoms):
        corr = (residual @ dictionary.T).abs()  # [n m]
        corr.scatter_(1, chosen[:, :k], -1.0)  # an atom is chosen once
        pick = corr.argmax(1)  # [n]
        chosen[:, k] = pick
        atom = dictionary[pick]  # [n d]
        done = basis[:, :k]  # [n k d]
        for _ in range(2):
            atom = atom - torch.bmm(torch.bmm(done, atom.unsqueeze(-1)).transpose(1, 2), done).squeeze(1)
        norm = atom.norm(dim=-1, keepdim=True)
        q = torch.where(norm > 1e-6, atom / norm.clamp_min(1e-30), torch.zeros_like(atom))  # in the span already: 0
        basis[:, k] = q
        residual = residual - (residual * q).sum(-1, keepdim=True) * q
    return x - residual
