"""The conformance suite of a token source (``register_token_sources``): what every ``--dataset NAME`` returns."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from klgap.errors import KlgapError
from klgap.testing.models import model_for_tests


class TokenSourceConformance:
    """A token source: set ``source`` (its registered name) and, if it takes one, ``arg`` (what follows
    ``NAME:``); ``model`` is the model whose tokens it makes (default tiny-gpt2)."""

    source: ClassVar[str]
    arg: ClassVar[str | None] = None
    model: ClassVar[str] = "tiny-gpt2"
    n_contexts: ClassVar[int] = 4
    context_len: ClassVar[int] = 16

    @pytest.fixture
    def lm(self):
        return model_for_tests(self.model, "cpu")

    def contexts(self, lm, seed: int = 0, prepend_bos: bool = True, context_len: int | None = None) -> torch.Tensor:
        from klgap.plugins.manager import registry

        obj = registry("token_source").get(self.source)
        return obj.contexts(lm, self.n_contexts, context_len or self.context_len, seed, prepend_bos, self.arg)

    def test_registered_with_a_description(self):
        from klgap.plugins.manager import registry

        entry = registry("token_source").entries.get(self.source)
        assert entry is not None, f"no token source is registered as {self.source!r}"
        assert entry.description, f"token source {self.source!r} has no description"

    def test_shape_and_dtype(self, lm):
        ids = self.contexts(lm)
        expected = (self.n_contexts, self.context_len)
        assert isinstance(ids, torch.Tensor) and tuple(ids.shape) == expected, f"shape {tuple(ids.shape)}, expected {expected}"
        assert ids.dtype == torch.long, f"token ids are {ids.dtype}, expected int64"

    def test_ids_are_tokens_of_the_model(self, lm):
        ids = self.contexts(lm)
        assert int(ids.min()) >= 0 and int(ids.max()) < lm.vocab_size, (
            f"ids span [{int(ids.min())}, {int(ids.max())}], outside {lm.name}'s vocabulary of {lm.vocab_size}"
        )

    def test_bos_in_column_zero_when_asked(self, lm):
        if lm.bos_token_id is None:
            pytest.skip(f"{lm.name} has no BOS token")
        ids = self.contexts(lm, prepend_bos=True)
        assert bool((ids[:, 0] == lm.bos_token_id).all()), "prepend_bos=True but column 0 is not BOS"

    def test_same_seed_same_contexts(self, lm):
        assert torch.equal(self.contexts(lm, seed=3), self.contexts(lm, seed=3)), "the same seed gave other contexts"

    def test_declared_splits_are_readable_and_apart(self, lm):
        """A source declaring splits (klgap.protocols.SplitTokenSource) names, for each role, a split it reads; with
        no split named, training and measuring read different splits of the same source."""
        from klgap.plugins.manager import registry
        from klgap.protocols import SplitTokenSource, TokenSplit

        obj = registry("token_source").get(self.source)
        if not isinstance(obj, SplitTokenSource):
            pytest.skip(f"token source {self.source!r} declares no splits")
        found = {role: obj.split_for(self.arg, role) for role in ("train", "measure")}
        for role, split in found.items():
            assert isinstance(split, TokenSplit), f"split_for({self.arg!r}, {role!r}) returned {type(split).__name__}"
            ids = obj.contexts(lm, self.n_contexts, self.context_len, 0, True, split.arg)
            assert tuple(ids.shape) == (self.n_contexts, self.context_len)
        if found["train"].chosen and found["measure"].chosen:
            assert found["train"].whole == found["measure"].whole and found["train"].split != found["measure"].split, (
                f"with no split named, training reads {found['train']} and measuring {found['measure']}: not apart")

    def test_a_context_longer_than_the_model_takes_is_a_clear_error(self, lm):
        with pytest.raises(KlgapError):
            self.contexts(lm, context_len=lm.max_context + 1)


__all__ = ["TokenSourceConformance"]
