"""klgap.plan.specs: `NAME:ARG` and an intervention's `NAME:key=value,...`, parsed in one place."""

from __future__ import annotations

import pytest

from klgap.errors import KlgapError
from klgap.plan.specs import parse_intervention, split_interventions, split_spec


@pytest.mark.parametrize("text,parts", [
    ("random", ("random", None)),
    ("text:corpus/eval", ("text", "corpus/eval")),
    ("hf:wikitext:validation", ("hf", "wikitext:validation")),  # only the first ':' splits
    ("text:", ("text", "")),
    ("sae_lens:gpt2-small-res-jb/blocks.3.hook_resid_pre", ("sae_lens", "gpt2-small-res-jb/blocks.3.hook_resid_pre")),
])
def test_split_spec(text, parts):
    assert split_spec(text) == parts


def test_parse_intervention():
    assert parse_intervention("sae") == ("sae", {})
    assert parse_intervention("cosine_matched:cos=0.8, norm_frac=0.9") == ("cosine_matched", {"cos": "0.8", "norm_frac": "0.9"})
    assert parse_intervention("cosine_matched:") == ("cosine_matched", {})
    with pytest.raises(KlgapError, match="cannot read parameter 'cos' of intervention 'cosine_matched:cos'"):
        parse_intervention("cosine_matched:cos")
    with pytest.raises(KlgapError, match="write NAME:key=value,key=value"):
        parse_intervention("cosine_matched:=0.8")


def test_split_interventions():
    assert split_interventions("sae,epsilon_random,cosine_matched:cos=0.8,norm_frac=0.9") == [
        "sae", "epsilon_random", "cosine_matched:cos=0.8,norm_frac=0.9"]
    assert split_interventions(["sae", "theta_random, cosine_matched:cos=1"]) == ["sae", "theta_random", "cosine_matched:cos=1"]

