"""Are a run's measured tokens apart from its SAE's training tokens? Judged from the token source's splits
(klgap.protocols.SplitTokenSource) and what the SAE's training.json records (klgap.sae.tokens.TrainingTokens):
the same source and split, or one of them read whole, overlap; the same source and another split are disjoint;
anything else is not known. The answer is recorded in run.json and report.json (``held_out``), an overlap is said
on stderr, in the report's notes and in its opening block (klgap/render/lead.py)."""

from __future__ import annotations

import sys

from klgap.plan.resolve import TokenSourceRef
from klgap.protocols import LoadedSAE
from klgap.report.schema import HeldOut
from klgap.sae.tokens import TrainingTokens


def held_out(tokens: TokenSourceRef, sae: LoadedSAE, dataset: str) -> HeldOut:
    """How the tokens `tokens` reads (`dataset`: the run's config's, as resolved) stand to the tokens `sae` was
    trained on (its training.json, which the SAE folder loader keeps in ``sae.info["training"]``)."""
    training = sae.info.get("training")
    trained = TrainingTokens.of(training)
    facts = {"dataset": dataset, "split": tokens.split, "chosen": tokens.chosen,
             "trained_on": trained.dataset if trained is not None else None}
    if trained is not None and trained.source == tokens.name and trained.split_of == tokens.whole:
        if trained.split is not None and tokens.split is not None and trained.split != tokens.split:
            return HeldOut(**facts, status="disjoint")
        return HeldOut(**facts, status="overlap", why=(
            f"the measured tokens ({dataset}) overlap the SAE's training tokens ({trained.dataset}, per its "
            "training.json): it is measured on text it was trained on; measure another split of the source "
            "(e.g. --dataset sample:eval, text:CORPUS/eval) or train on one apart from it"))
    if tokens.split is None:
        return HeldOut(**facts, status="unknown", why=(
            f"the measured tokens ({dataset}) are not known to be disjoint from the SAE's training tokens: they are "
            "read whole, not from a split held apart (a source with train/eval splits, e.g. sample or a corpus from "
            "`klgap build-corpus`, reads its eval split by default)"))
    if isinstance(training, dict) and trained is None:  # a klgap SAE trained before its tokens were recorded
        return HeldOut(**facts, status="unknown", why=(
            f"the SAE's training.json does not record its tokens (train-sae then read all of --dataset, by default "
            f"the whole sample): the measured tokens ({dataset}) may overlap them; train it again to know"))
    return HeldOut(**facts, status="unknown")


def say(found: HeldOut) -> None:
    """An overlap, on stderr (it is also in the report's notes and opening block)."""
    if found.status == "overlap":
        print(f"klgap: warning: {found.why}", file=sys.stderr)


__all__ = ["held_out", "say"]
