"""A plain PyTorch hook on a site's module, shared by the fast paths (klgap/forward/suffix.py, klgap/forward/kvcache.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from klgap.protocols import SiteSpec


def register_site_hook(module: torch.nn.Module, spec: SiteSpec, swap: Callable[[Tensor], Tensor | None]) -> Any:
    """Hook `module` so that `swap` sees the site's ``[b pos d]`` tensor on every call.

    `swap` returns None to leave the tensor as it is (e.g. after recording it) or a tensor to put in its place.
    A site that is a module's input (``spec.io == "input"``) gets a forward pre-hook; an output gets a forward
    hook, which replaces only element ``spec.index`` of a tuple output. Returns the hook handle.
    """
    if spec.io == "input":

        def pre(module, args, kwargs):
            new = swap(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, output):
        new = swap(output if spec.index is None else output[spec.index])
        if new is None or spec.index is None:
            return new
        return (*output[: spec.index], new, *output[spec.index + 1 :])

    return module.register_forward_hook(post)
