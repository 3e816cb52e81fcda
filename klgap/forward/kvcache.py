"""Single-token and many-samples runs that reuse the keys and values of the positions before t.

A substitute patched at position t cannot change positions < t (the model is causal), so their keys and
values are the same in the clean run and in every patched run. The clean run therefore goes in two calls of
the model's own forward: positions < t with ``use_cache=True`` (the prefix cache), then positions t..t+k on
top of that cache. Each patched run (one per intervention, or one per chunk of many-samples draws) is one
more call on positions t..t+k only, on a fresh view of the prefix cache, with a plain hook on the site's module
overwriting position t. Nothing is re-implemented: the cache is Hugging Face's ``DynamicCache``.

The engine checks the first batch against a full forward pass (clean logits at t..t+k, and a patch with
x' = x) and falls back to full forwards if they differ, as it does for the suffix replay (klgap/forward/suffix.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from klgap.forward.hooks import register_site_hook
from klgap.protocols import LoadedModel, SiteSpec


class PrefixCacheRunner:
    """Clean run split at t; patched runs compute only positions t..t+k."""

    def __init__(self, model: LoadedModel, spec: SiteSpec) -> None:
        self.model, self.spec = model, spec
        self.site_module = model.hf_model.get_submodule(spec.module)
        self.cache_arg = model.cache_arg  # the adapter says which keyword the model's forward takes its cache by
        self.prefix: Any = None  # DynamicCache of positions < t for the current batch
        self.t = 0
        self._record: list[Tensor] = []
        self._patch: Tensor | None = None

    @staticmethod
    def supported(model: LoadedModel) -> bool:
        return model.kv_cache and not model.remote and model.hf_model is not None

    @torch.no_grad()
    def clean(self, ids: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Clean run of ``ids [b, t+L]``: (site activation at t..t+L-1 ``[b L d]``, logits there ``[b L vocab]``).

        Keeps the cache of positions < t for :meth:`patched`.
        """
        if t < 1:
            raise ValueError(f"a prefix cache needs t >= 1, got t={t}")
        self.t = t
        out = self.model.hf_model(input_ids=ids[:, :t], use_cache=True)
        self.prefix = getattr(out, "cache", None) or out.past_key_values
        handle = self._hook()
        self._record = []
        try:
            logits = self.model.hf_model(input_ids=ids[:, t:], use_cache=True, **{self.cache_arg: self._fresh(None)}).logits
        finally:
            handle.remove()
        return self._record[0], logits

    @torch.no_grad()
    def patched(self, tail_ids: Tensor, x_prime: Tensor, rows: Tensor | None = None) -> Tensor:
        """Logits at t..t+L-1 with the site at t replaced by ``x_prime [n d]``.

        tail_ids: ``[n L]`` the tokens at t..t+L-1 of each row; rows: which context of the batch each row
        belongs to (``[n]``, repeats allowed: many-samples draws); None means row i is context i.
        """
        self._patch = x_prime
        handle = self._hook()
        try:
            return self.model.hf_model(input_ids=tail_ids, use_cache=True, **{self.cache_arg: self._fresh(rows)}).logits
        finally:
            self._patch = None
            handle.remove()

    def _fresh(self, rows: Tensor | None) -> Any:
        """A cache holding the prefix (rows selected), whose updates never touch the kept prefix tensors."""
        cache = copy.copy(self.prefix)
        cache.layers = [copy.copy(layer) for layer in self.prefix.layers]
        if rows is not None:
            cache.batch_select_indices(rows.to(self.model.device))
        return cache

    def _hook(self) -> Any:
        """Records the site (clean run) or puts x' at the first tail position, t (patched run)."""

        def swap(tensor: Tensor) -> Tensor | None:
            if self._patch is None:
                self._record.append(tensor.clone())
                return None
            out = tensor.clone()
            out[:, 0] = self._patch.to(out.dtype)
            return out

        return register_site_hook(self.site_module, self.spec, swap)
