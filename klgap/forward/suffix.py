"""Run only the layers above a site: the prefix below it is the same for every intervention.

In all-token mode every intervention shares the clean run up to the site, so the engine runs the model
once (clean), keeping the input of every block from the site's block up, and then, per intervention,
calls the model's own blocks from there, its final norm and its unembedding — Hugging Face modules,
called with the exact arguments the model's own forward gave them. Nothing is re-implemented, and the
first batch proves it: the replay of the clean run must reproduce the model's logits, else the engine
falls back to full forward passes (and says so in the report).

The adapter opts in by describing its layout in ``LoadedModel.layout``:
``BlockLayout(blocks="model.layers", final_norm="model.norm", unembed="lm_head")``, plus ``logit_softcap=C``
when the model's head caps its logits (Gemma 2: ``C * tanh(logits / C)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from klgap.forward.hooks import register_site_hook
from klgap.protocols import LoadedModel, SiteSpec


class SuffixRunner:
    """Clean forward that records each block's call, then cheap patched replays of the suffix."""

    def __init__(self, model: LoadedModel, spec: SiteSpec, layer: int) -> None:
        layout = model.layout
        root = model.hf_model
        self.model, self.spec = model, spec
        self.blocks = [root.get_submodule(f"{layout.blocks}.{i}") for i in range(model.n_layers)]
        self.final_norm = root.get_submodule(layout.final_norm)
        self.unembed = root.get_submodule(layout.unembed)
        self.softcap: float | None = layout.logit_softcap
        self.site_module = root.get_submodule(spec.module)
        # A site that is a block's input or output (resid_pre / resid_post) is the hidden state itself;
        # any other site lives inside block L and is patched by a hook while block L reruns.
        self.direct = spec.module == f"{layout.blocks}.{layer}"
        self.first = layer + 1 if (self.direct and spec.io == "output") else layer
        self.calls: list[tuple[tuple, dict]] = []
        self._tiled: dict[int, list[tuple[tuple, dict]]] = {}
        self.site_value: Tensor | None = None
        self._patch: tuple[Tensor, slice] | None = None

    @staticmethod
    def supported(model: LoadedModel) -> bool:
        return model.layout is not None and not model.remote

    @torch.no_grad()
    def clean(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Full clean forward: (site activation ``[b pos d]``, logits); records the suffix blocks' calls."""
        logits = shared_clean([self], ids)
        return self.site_value, logits

    def clean_hooks(self) -> list[Any]:
        """Hooks that record, during a clean forward, this runner's site and its suffix blocks' calls."""
        self.calls, self._tiled = [], {}
        handles = [
            block.register_forward_pre_hook(lambda m, a, k: self.calls.append((a, k)), with_kwargs=True)
            for block in self.blocks[self.first :]
        ]
        handles.append(self._site_hook())
        return handles

    @torch.no_grad()
    def patched(self, x_prime: Tensor, positions: slice, copies: int = 1, rows: int | None = None) -> Tensor:
        """Logits with the site replaced by `x_prime` at `positions`, running only the layers above it.

        copies > 1 stacks that many substitutes along the batch: ``x_prime [copies*b npos d]`` (copy-major)
        gives logits ``[copies*b pos vocab]``; every batch-sized argument of the recorded calls is tiled.
        rows: replay only the batch's first `rows` contexts (b = rows; the executor's check)."""
        return self.replay(x_prime, positions, copies, rows)

    def replay(self, x_prime: Tensor, positions: slice, copies: int = 1, rows: int | None = None) -> Tensor:
        """:meth:`patched` under the caller's autograd mode: a differentiable function of `x_prime` (the JVPs and
        Fisher-vector products of klgap/forward/fisher.py go through it)."""
        batch = len(self.site_value)
        calls = self._tiled_calls(copies) if rows is None or rows == batch else self._first_rows(rows, copies)
        handle = None
        if self.direct:
            hidden = _replace(_tile(_head(self.site_value, rows, batch), copies, rows or batch), x_prime, positions)
        else:
            args, kwargs = self.calls[0]
            hidden = _tile(_head(args[0] if args else kwargs["hidden_states"], rows, batch), copies, rows or batch)
            self._patch = (x_prime, positions)
            handle = self._site_hook()
        try:
            for block, (args, kwargs) in zip(self.blocks[self.first :], calls, strict=True):
                out = block(hidden, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out
        finally:
            self._patch = None
            if handle is not None:
                handle.remove()
        logits = self.unembed(self.final_norm(hidden))
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def _tiled_calls(self, copies: int) -> list[tuple[tuple, dict]]:
        """The recorded block calls with every batch-sized argument repeated `copies` times (cached per batch).

        The hidden states each call was given are left as they are: the replay passes its own."""
        if copies == 1:
            return self.calls
        if copies not in self._tiled:
            batch = len(self.site_value)
            self._tiled[copies] = [
                ((args[0], *_tile(args[1:], copies, batch)) if args else (),
                 {k: v if k == "hidden_states" else _tile(v, copies, batch) for k, v in kwargs.items()})
                for args, kwargs in self.calls
            ]
        return self._tiled[copies]

    def _first_rows(self, rows: int, copies: int) -> list[tuple[tuple, dict]]:
        """The recorded block calls cut to the batch's first `rows` contexts (then tiled `copies` times)."""
        batch = len(self.site_value)
        return [
            ((args[0], *_tile(_head(args[1:], rows, batch), copies, rows)) if args else (),
             {k: v if k == "hidden_states" else _tile(_head(v, rows, batch), copies, rows) for k, v in kwargs.items()})
            for args, kwargs in self.calls
        ]

    def _site_hook(self) -> Any:
        """A plain hook on the site's module: records the tensor (clean run) or overwrites it (patched run)."""

        def swap(tensor: Tensor) -> Tensor | None:
            if self._patch is None:
                self.site_value = tensor.clone()
                return None
            return _replace(tensor, *self._patch)

        return register_site_hook(self.site_module, self.spec, swap)


@torch.no_grad()
def shared_clean(runners: list[SuffixRunner], ids: Tensor) -> Tensor:
    """One clean forward for several runners on the same model (a study's sites and layers): each records
    its own site and suffix calls; returns the logits ``[b pos vocab]``."""
    handles = [handle for runner in runners for handle in runner.clean_hooks()]
    try:
        return runners[0].model.hf_model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def _replace(value: Tensor, x_prime: Tensor, positions: slice) -> Tensor:
    out = value.clone()
    out[:, positions] = x_prime
    return out


def _map_batched(value: Any, batch: int, fn: Any) -> Any:
    """`fn` applied to every tensor whose first axis is the batch (``[batch, ...]``, 2-D or more) inside tuples,
    lists and dicts; anything else (broadcast ``[1, ...]`` tensors, 1-D cache positions, flags) as it is."""
    if isinstance(value, Tensor):
        return fn(value) if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_map_batched(v, batch, fn) for v in value)
    if isinstance(value, list):
        return [_map_batched(v, batch, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_batched(v, batch, fn) for k, v in value.items()}
    return value


def _head(value: Any, rows: int | None, batch: int) -> Any:
    """The first `rows` of every tensor whose first axis is the batch (as :func:`_tile` finds them); None: all."""
    if rows is None or rows == batch:
        return value
    return _map_batched(value, batch, lambda t: t[:rows])


def _tile(value: Any, copies: int, batch: int) -> Any:
    """Repeat every tensor whose first axis is the batch `copies` times along it (:func:`_map_batched`); anything
    else is shared as it is."""
    if copies == 1:
        return value
    return _map_batched(value, batch, lambda t: t.repeat(copies, *([1] * (t.dim() - 1))))
