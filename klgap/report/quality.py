"""The SAE's quality beside every verdict: its explained variance, L0, (where zero ablation was measured)
kl_div_score and ce_loss_score, and the run's clean CE in the sentence a page opens with, and a note when the verdict is about something other than a working
SAE's errors.

A note is written (report.json's ``quality_notes``, the opening block, stderr at the end of a run) when, on the
run's measured tokens:

- explained variance ≤ 0: x̂ explains no more of the activations' variance than their mean does;
- L0 = 0: no feature is active, so x̂ is the decoder bias alone (near zero: a near-zero ablation);
- L0 > d_in / 2: codes this dense are hardly sparse;
- or the SAE's training.json (a klgap-trained SAE) says it was trained on fewer than :data:`TRAINING_TOKEN_FLOOR`
  tokens (``n_training_tokens``: distinct activations, each possibly seen several times).

The floor is 1M tokens: the SAEs published with sae_lens and SAEBench are trained on tens of millions of tokens or
more, and below a million an SAE of a few thousand features has seen a typical feature fire only a few hundred times;
the verdict may describe an SAE far from converged.

At an anisotropic site (the activations' mean offset ‖x̄‖² / mean ‖x‖², or their first principal component's share of
the variance, at least :data:`ANISOTROPIC_SHARE`; klgap/report/anisotropy.py) the clause also gives the mean-offset
share and the explained variance with the top principal component removed, and with the fewest that explain half the
variance removed: there a pooled explained variance can be mostly about a few directions. One function per fact: :func:`sae_quality` reads the
numbers out of a report, :meth:`SaeQuality.notes` says which notes they give, :func:`reconstruction_phrase` is the
subject of every opening sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from klgap.render.formatting import fmt, fmt_fixed
from klgap.report.schema import QualityNote, Report, SAEInfo, SAEMetrics, SaeLensScores, SiteSummary

#: an SAE trained on fewer distinct tokens than this (its training.json's ``n_training_tokens``) gets a note
TRAINING_TOKEN_FLOOR = 1_000_000
#: mean ‖x̂‖ at most this share of mean ‖x‖ is "near zero"
NEAR_ZERO_SHARE = 0.01
#: a site is anisotropic when its mean offset or its first principal component holds at least this share
ANISOTROPIC_SHARE = 0.5


@dataclass(frozen=True)
class SaeQuality:
    """An SAE's quality on a run's measured tokens (explained variance, mean L0, mean ‖x̂‖ and ‖x‖), its input width,
    sae_lens's kl_div_score when zero ablation was measured, and the tokens it was trained on when it says."""

    explained_variance: float | None
    l0_mean: float | None
    d_in: int
    x_hat_norm_mean: float | None = None
    x_norm_mean: float | None = None
    kl_div_score: float | None = None
    training_tokens: int | None = None
    ce_loss_score: float | None = None
    ce_loss_score_withheld: bool = False  # its interval's denominator CE_zero − CE_clean may be 0
    ce_clean: float | None = None  # the clean run's mean next-token CE, nats per token
    mean_offset_share: float | None = None
    top_pc_share: float | None = None
    ev_top_pc_removed: float | None = None
    ev_top_pcs_removed: float | None = None
    top_pcs_removed: tuple[int, int] | None = None  # the fewest explaining half the variance: (min, max) over batches

    @property
    def anisotropic(self) -> bool:
        """The mean offset or the first principal component holds at least ANISOTROPIC_SHARE."""
        return any(v is not None and v >= ANISOTROPIC_SHARE for v in (self.mean_offset_share, self.top_pc_share))

    def clause(self) -> str:
        """'explained variance 0.832, L0 12.3, kl_div_score 0.951, ce_loss_score 0.940, clean CE 3.214 nats/token'
        (the scores only where zero ablation was measured, the clean CE where the run recorded it), and at an
        anisotropic site its anisotropy (:meth:`anisotropy_clause`)."""
        parts = [f"explained variance {fmt_fixed(self.explained_variance)}", f"L0 {fmt(self.l0_mean, 3)}"]
        if self.kl_div_score is not None:
            parts.append(f"kl_div_score {fmt_fixed(self.kl_div_score)}")
            parts.append("ce_loss_score withheld" if self.ce_loss_score_withheld
                         else f"ce_loss_score {fmt_fixed(self.ce_loss_score)}")
        if self.ce_clean is not None:
            parts.append(f"clean CE {fmt_fixed(self.ce_clean)} nats/token")
        if self.anisotropic:
            parts.append(self.anisotropy_clause())
        return ", ".join(parts)

    def anisotropy_clause(self) -> str:
        """'mean offset 0.93 of mean ‖x‖², top principal component 0.41 of the variance; explained variance 0.612
        without it, 0.587 without the top 2–3 (half the variance)'."""
        shares = [] if self.mean_offset_share is None else [f"mean offset {fmt_fixed(self.mean_offset_share)} of mean ‖x‖²"]
        if self.top_pc_share is not None:  # (None where no batch had enough rows for its principal components)
            shares.append(f"top principal component {fmt_fixed(self.top_pc_share)} of the variance")
        text = ", ".join(shares)
        if self.ev_top_pc_removed is None:
            return text
        text += f"; explained variance {fmt_fixed(self.ev_top_pc_removed)} without it"
        if self.top_pcs_removed is not None and self.ev_top_pcs_removed is not None:
            low, high = self.top_pcs_removed
            k = str(low) if low == high else f"{low}–{high}"
            text += f", {fmt_fixed(self.ev_top_pcs_removed)} without the top {k} (half the variance)"
        return text

    @property
    def near_zero(self) -> bool:
        """Mean ‖x̂‖ at most NEAR_ZERO_SHARE of mean ‖x‖."""
        if self.x_hat_norm_mean is None or not self.x_norm_mean:
            return False
        return self.x_hat_norm_mean <= NEAR_ZERO_SHARE * self.x_norm_mean

    def notes(self) -> list[QualityNote]:
        """The notes these numbers give (module docstring), most basic first."""
        out = []
        ev, l0 = self.explained_variance, self.l0_mean
        zero_ablation = "this compares a near-zero ablation with noise, not an SAE's errors"
        if l0 is not None and l0 == 0:
            what = (f"x̂ is its decoder bias alone, here near zero (mean ‖x̂‖ {fmt(self.x_hat_norm_mean, 3)} against "
                    f"mean ‖x‖ {fmt(self.x_norm_mean, 3)}): {zero_ablation}" if self.near_zero
                    else "x̂ is its decoder bias alone, the same vector at every token: this compares replacing the "
                         "activation by a constant with noise, not an SAE's errors")
            out.append(QualityNote(kind="no_active_features",
                                   text=f"L0 is 0: no feature of the SAE is active on the measured tokens, so {what}"))
        if ev is not None and ev <= 0:
            what = ("as an x̂ near zero gives" if out else f"x̂ is near zero: {zero_ablation}") if self.near_zero \
                else "the verdict is about a failed reconstruction, not an SAE's errors"
            out.append(QualityNote(kind="explained_variance_not_positive",
                                   text=f"explained variance {fmt_fixed(ev)} ≤ 0: x̂ explains no more of the activations' "
                                        f"variance than their mean does; {what}"))
        if l0 is not None and l0 > self.d_in / 2:
            out.append(QualityNote(kind="dense_codes",
                                   text=f"L0 {fmt(l0, 3)} is above half the SAE's input width ({self.d_in}): codes this "
                                        "dense are hardly sparse, so the verdict says little about a sparse dictionary"))
        if self.training_tokens is not None and self.training_tokens < TRAINING_TOKEN_FLOOR:
            out.append(QualityNote(kind="few_training_tokens",
                                   text=f"the SAE was trained on {self.training_tokens:,} tokens (its training.json), "
                                        f"fewer than {TRAINING_TOKEN_FLOOR:,}: it may be far from converged, and the "
                                        "verdict need not hold for a fully trained SAE"))
        return out


def training_tokens(sae: SAEInfo) -> int | None:
    """The distinct tokens a klgap-trained SAE was trained on (its training.json's ``n_training_tokens``, which the
    loader keeps as ``info["training"]``); None when the SAE's folder says nothing."""
    training: Any = sae.info.get("training")
    tokens = training.get("n_training_tokens") if isinstance(training, dict) else None
    return int(tokens) if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) else None


def quality_of(metrics: SAEMetrics, sae: SAEInfo, scores: SaeLensScores | None,
               ce_clean: float | None = None) -> SaeQuality:
    """The quality of an SAE from a run's numbers (before or after they are in a report); `ce_clean`: the run's
    mean clean CE, shown beside the scores."""
    return SaeQuality(explained_variance=metrics.explained_variance, l0_mean=metrics.l0_mean, d_in=sae.d_in,
                      x_hat_norm_mean=metrics.x_hat_norm_mean, x_norm_mean=metrics.x_norm_mean,
                      kl_div_score=scores.kl_div_score if scores is not None else None,
                      training_tokens=training_tokens(sae),
                      ce_loss_score=scores.ce_loss_score if scores is not None else None,
                      ce_loss_score_withheld=scores is not None and scores.ce_loss_score_withheld is not None,
                      ce_clean=ce_clean, mean_offset_share=metrics.mean_offset_share,
                      top_pc_share=metrics.top_pc_share, ev_top_pc_removed=metrics.explained_variance_top_pc_removed,
                      ev_top_pcs_removed=metrics.explained_variance_top_pcs_removed,
                      top_pcs_removed=None if metrics.top_pcs_removed_min is None or metrics.top_pcs_removed_max is None
                      else (metrics.top_pcs_removed_min, metrics.top_pcs_removed_max))


def sae_quality(run: SiteSummary) -> SaeQuality | None:
    """The quality of a run's SAE (a run report, or one run of a study); None for a joint run, whose SAEs are its
    sites' (each in its own report; the joint report's notes name them)."""
    if isinstance(run, Report) and run.joint is not None:
        return None
    return quality_of(run.sae_metrics, run.sae, run.sae_lens_scores, run.ce_clean.mean if run.ce_clean else None)


def reconstruction_phrase(quality: SaeQuality | None) -> str:
    """The subject of an opening sentence: "the SAE's reconstruction (explained variance 0.832, L0 12.3)"."""
    return "the SAE's reconstruction" + (f" ({quality.clause()})" if quality is not None else "")


def notes_text(notes: list[QualityNote]) -> str:
    """The notes as they follow an opening sentence: ' Quality note: …. Quality note: ….' ('' without notes)."""
    return "".join(f" Quality note: {note.text}." for note in notes)


__all__ = ["ANISOTROPIC_SHARE", "NEAR_ZERO_SHARE", "TRAINING_TOKEN_FLOOR", "SaeQuality", "notes_text", "quality_of",
           "reconstruction_phrase", "sae_quality", "training_tokens"]
