"""Per-token metrics from logits: KL(P_clean || P_patched), the CE-loss change and the clean CE, in float32.

Every intervention of a batch is measured against the same clean run, so the clean side is kept once per
batch (:class:`CleanReference`) and each patched run costs a fused pass over its logits, written in terms
of the logit change ``d = z' − z`` (z: clean logits, z': patched):

    KL(P || P') = log E_P[exp(d)] − E_P[d] = log1p(E_P[expm1(d − m)]),   m = E_P[d]
    ΔCE         = CE(P') − CE(P) = KL + m − d[next token]

The first form needs no log-softmax of the patched logits (no second ``[b pos vocab]`` tensor: the patched
logits are overwritten in place) and keeps its precision when KL is tiny (it is computed from d − m, not as a
difference of two log-probabilities of size ~10). Rows where d − m is so large that exp overflows fall back to
a max-shifted log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from klgap.forward.finite import all_finite, check_clean_logits

EXP_SAFE = 60.0  # rows whose max(d − m) exceeds this are measured with a max-shifted log-sum-exp
CHUNK_BYTES = 1 << 23  # CPU: rows per step of the fused pass, ~8 MiB of logits (1–8 MiB measured alike), cache-sized
CHUNK_BYTES_GPU = 1 << 28  # GPU: ~256 MiB per step, few kernel launches and bounded temporaries


def log_probs(logits: Tensor) -> Tensor:
    """``[batch pos vocab]`` logits -> log-probabilities in float32 (float64 stays float64: reference runs)."""
    return torch.log_softmax(_compute_dtype(logits), dim=-1)


def _compute_dtype(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


@dataclass
class CleanReference:
    """The clean run's logits ``z`` and probabilities ``p``, ``[batch pos vocab]``, float32 (float64 stays).

    ``p`` is computed in float64 and rounded once: a float32 softmax is off by up to ~1e-5 (relative) in the
    tail of the vocabulary, which would put ~1e-4 errors into KL values of a few nats."""

    z: Tensor
    p: Tensor
    finite: bool = True  # every clean logit finite (else every measure takes the textbook path)

    @classmethod
    def of(cls, clean_logits: Tensor) -> "CleanReference":
        """Raises KlgapError on NaN or +inf clean logits (klgap.forward.finite.check_clean_logits)."""
        check_clean_logits(clean_logits)
        z = _compute_dtype(clean_logits)
        p = torch.empty_like(z)
        flat_z, flat_p = z.reshape(-1, z.shape[-1]), p.view(-1, z.shape[-1])
        rows = _chunk_rows(z)
        for start in range(0, flat_z.shape[0], rows):
            flat_p[start : start + rows] = torch.softmax(flat_z[start : start + rows].double(), dim=-1)
        return cls(z, p, all_finite(z))

    def select(self, rows: Tensor | slice | None = None, positions: slice | None = None) -> "CleanReference":
        """A sub-reference: some rows (contexts, possibly repeated) and/or positions."""
        z, p = self.z, self.p
        if rows is not None:
            z, p = z[rows], p[rows]
        if positions is not None:
            z, p = z[:, positions], p[:, positions]
        return CleanReference(z, p, self.finite)

    def ce(self, next_ids: Tensor) -> Tensor:
        """The clean run's cross-entropy of the true next token, ``−log P(next)`` in nats, ``[batch pos]`` (the
        reference's dtype): log-sum-exp of the clean logits minus the next token's, a chunk of rows at a time.
        ``next_ids [batch pos]``: < 0 where unknown (NaN there, as ΔCE)."""
        shape, vocab = self.z.shape[:-1], self.z.shape[-1]
        z, nxt = self.z.reshape(-1, vocab), next_ids.reshape(-1)
        out = torch.empty(z.shape[0], dtype=self.z.dtype, device=z.device)
        rows = _chunk_rows(z)
        for start in range(0, z.shape[0], rows):
            sl = slice(start, start + rows)
            picked = z[sl].gather(-1, nxt[sl].clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[sl] = torch.logsumexp(z[sl], dim=-1) - picked
        return _masked(out, nxt).view(shape)

    def measure(self, patched_logits: Tensor, next_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(KL, ΔCE), each ``[batch pos]`` float32, against ``patched_logits [batch pos vocab]``.

        The patched logits are overwritten (they are the caller's last use of them). ``next_ids [batch pos]``:
        the true next token; < 0 where unknown (ΔCE is NaN there)."""
        if not self.finite:  # −inf clean logits (a masked vocabulary): d = z' − z is undefined there
            return _textbook(self.z, _compute_dtype(patched_logits), next_ids)
        shape, vocab = patched_logits.shape[:-1], patched_logits.shape[-1]
        d = patched_logits.reshape(-1, vocab)  # a view where it can be (else a copy, ours as well)
        z, p, nxt = self.z.reshape(-1, vocab), self.p.reshape(-1, vocab), next_ids.reshape(-1)
        out = self.z.dtype
        kl, ce = torch.empty(d.shape[0], dtype=out, device=d.device), torch.empty(d.shape[0], dtype=out, device=d.device)
        rows = _chunk_rows(z)
        for start in range(0, d.shape[0], rows):
            sl = slice(start, start + rows)
            # low-precision logits are converted a chunk at a time (cache-sized), float32 ones are used in place
            kl[sl], ce[sl] = _measure_rows(_compute_dtype(d[sl]), z[sl], p[sl], nxt[sl])
        return kl.view(shape), ce.view(shape)


def _chunk_rows(logits: Tensor) -> int:
    budget = CHUNK_BYTES if logits.device.type == "cpu" else CHUNK_BYTES_GPU
    return max(1, budget // (logits.shape[-1] * logits.element_size()))


def _measure_rows(d: Tensor, z: Tensor, p: Tensor, next_ids: Tensor) -> tuple[Tensor, Tensor]:
    """KL and ΔCE of rows ``[n vocab]``: ``d`` holds the patched logits and is overwritten."""
    d.sub_(z)  # d = z' − z
    m = (p * d).sum(-1)  # E_P[d]
    bad = ~torch.isfinite(m)  # ±inf patched logits in that row
    if bool(bad.any()):
        kl, ce = torch.empty_like(m), torch.empty_like(m)
        kl[bad], ce[bad] = _textbook(z[bad], d[bad] + z[bad], next_ids[bad])  # z' back (z is finite)
        good = ~bad
        kl[good], ce[good] = _fused(d[good], m[good], p[good], next_ids[good])
        return kl, ce
    return _fused(d, m, p, next_ids)


def _fused(d: Tensor, m: Tensor, p: Tensor, next_ids: Tensor) -> tuple[Tensor, Tensor]:
    """KL and ΔCE from the logit change ``d [n vocab]`` (overwritten), ``m = E_P[d]`` and ``p``."""
    d_next = d.gather(-1, next_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    d.sub_(m.unsqueeze(-1))
    peak = d.amax(-1)
    wild = peak > EXP_SAFE
    if bool(wild.any()):
        kl = torch.empty_like(m)
        shifted = d[wild] - peak[wild].unsqueeze(-1)  # log Σ p·exp(d − m) = peak + log Σ p·exp(d − m − peak)
        kl[wild] = torch.log((p[wild] * shifted.exp_()).sum(-1)) + peak[wild]
        tame = ~wild
        kl[tame] = torch.log1p((p[tame] * d[tame].expm1_()).sum(-1))
    else:
        kl = torch.log1p((p * d.expm1_()).sum(-1))
    return kl, _masked(kl + m - d_next, next_ids)


def _textbook(z: Tensor, z_patched: Tensor, next_ids: Tensor) -> tuple[Tensor, Tensor]:
    """KL and ΔCE from two log-softmaxes (rows with infinite logits)."""
    logp = log_probs(z)
    return kl_per_token(logp, z_patched), ce_delta_per_token(logp, z_patched, next_ids)


def _masked(ce: Tensor, next_ids: Tensor) -> Tensor:
    return torch.where(next_ids >= 0, ce, torch.full_like(ce, float("nan")))


def kl_per_token(clean_logp: Tensor, patched_logits: Tensor) -> Tensor:
    """KL(P || P') summed over the vocabulary, the textbook way (reference runners, tests):
    ``[batch pos vocab]`` x2 -> ``[batch pos]``."""
    patched_logp, p = log_probs(patched_logits), clean_logp.exp()
    return torch.where(p > 0, p * (clean_logp - patched_logp), 0.0).sum(-1)  # 0·log(0/0) = 0


def ce_delta_per_token(clean_logp: Tensor, patched_logits: Tensor, next_ids: Tensor) -> Tensor:
    """CE(P') − CE(P) on the true next token, the textbook way: ``next_ids [batch pos]`` -> ``[batch pos]``.

    Positions whose next token is unknown (``next_ids < 0``) give NaN.
    """
    patched_logp = log_probs(patched_logits)
    safe = next_ids.clamp(min=0).unsqueeze(-1)
    delta = clean_logp.gather(-1, safe).squeeze(-1) - patched_logp.gather(-1, safe).squeeze(-1)
    return torch.where(next_ids >= 0, delta, torch.full_like(delta, float("nan")))


def next_token_ids(ids: Tensor) -> Tensor:
    """``ids [batch pos]`` -> the token after each position, −1 at the last position."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    return nxt
