"""A site map for a causal LM whose architecture has no hand-written map (klgap_hf.families).

Two steps:

1. :func:`infer_family` (structure only, works on the meta device): the decoder blocks are the one
   ``ModuleList`` of ``num_hidden_layers`` modules of one class; ``resid_pre`` / ``resid_post`` are their input and
   output. The final norm and LM head are found by name for the suffix-replay fast path (the engine checks the
   replay against a full forward before using it).
2. :func:`identify_sublayers` (needs weights): one short forward with hooks on block 0 and its direct children.
   ``attn_out`` / ``mlp_out`` are mapped only when exactly one pair of those children's outputs adds up to what
   the block adds to the residual stream (block output − block input), the first of them being the attention
   module or called after it: that is the TransformerLens meaning of ``hook_attn_out`` / ``hook_mlp_out``, found
   by arithmetic rather than by names. ``attn_z`` is the input of the attention module's linear child whose output
   is the attention output. Anything else is refused with a message naming what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from klgap.errors import KlgapError
from klgap_hf.families import Family, Point, dims

ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
NORM_NAME = re.compile(r"norm|ln", re.IGNORECASE)
NOT_YET = "identified by a check forward pass when the model is loaded (klgap_hf.generic)"


def find_blocks(hf_model: nn.Module, n_layers: int) -> str:
    """The path of the ModuleList of `n_layers` blocks of one class; KlgapError naming what was found otherwise."""
    lists = [(name, module) for name, module in hf_model.named_modules() if isinstance(module, nn.ModuleList)]
    found = [
        name for name, module in lists
        if len(module) == n_layers and len({type(child) for child in module}) == 1
    ]
    if len(found) == 1:
        return found[0]
    seen = ", ".join(f"{name or '(root)'} ({len(m)} × {type(m[0]).__name__ if len(m) else '-'})" for name, m in lists)
    what = "none" if not found else f"several ({', '.join(found)})"
    raise KlgapError(
        f"cannot find the decoder blocks of {type(hf_model).__name__}: expected one ModuleList of "
        f"num_hidden_layers={n_layers} blocks of one class, found {what}; ModuleLists: {seen or 'none'}"
    )


def _path_of(hf_model: nn.Module, target: nn.Module | None) -> str:
    for name, module in hf_model.named_modules():
        if module is target:
            return name
    return ""


def _final_norm(hf_model: nn.Module, blocks: str) -> str:
    """The norm next to the blocks (same parent, 'norm' in its name, called last); '' when there is not exactly one."""
    parent_path = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    parent = hf_model.get_submodule(parent_path) if parent_path else hf_model
    norms = [name for name, child in parent.named_children() if NORM_NAME.search(name) and not isinstance(child, nn.ModuleList)]
    norms = [n for n in norms if "final" in n or n in ("norm", "ln_f")] or norms
    if len(norms) != 1:
        return ""
    return f"{parent_path}.{norms[0]}" if parent_path else norms[0]


def infer_family(hf_model: nn.Module, config: Any) -> Family:
    """The structural part of a generic map: blocks, resid_pre / resid_post, final norm and LM head (no forward)."""
    n_layers = dims(config)["n_layers"]
    blocks = find_blocks(hf_model, n_layers)
    unembed = _path_of(hf_model, hf_model.get_output_embeddings()) if hasattr(hf_model, "get_output_embeddings") else ""
    return Family(
        model_type=str(getattr(config, "model_type", type(hf_model).__name__)),
        blocks=blocks,
        final_norm=_final_norm(hf_model, blocks),
        unembed=unembed,
        attn_out=None, mlp_out=None, attn_z=None,
        unmapped=NOT_YET,
        note=f"no hand-written site map: blocks found at {blocks} (klgap_hf.generic); resid_pre / resid_post are "
             "their input and output",
        inferred=True,
    )


@dataclass
class _Call:
    """One direct child of block 0 as the check forward called it."""

    name: str
    order: int
    value: Tensor  # the [b pos d] tensor it returned
    index: int | None  # its place in a tuple output (None: the output is the tensor)
    is_norm: bool


def _tensor_of(output: Any, shape: torch.Size) -> tuple[Tensor | None, int | None]:
    if isinstance(output, Tensor):
        return (output, None) if output.shape == shape else (None, None)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor) and output[0].shape == shape:
        return output[0], 0
    return None, None


def _check_ids(config: Any, device: torch.device) -> Tensor:
    vocab = dims(config)["vocab_size"]
    return (torch.arange(1, 9) % vocab).unsqueeze(0).to(device)


@torch.no_grad()
def identify_sublayers(hf_model: nn.Module, family: Family, config: Any) -> Family:
    """`family` (from :func:`infer_family`) with attn_out / mlp_out / attn_z mapped where one forward pass shows
    them unambiguously; the reasons for anything left unmapped go into ``unmapped``."""
    block = hf_model.get_submodule(f"{family.blocks}.0")
    seen: dict[str, Any] = {}
    calls: list[tuple[str, Any]] = []
    linear_calls: list[tuple[str, Tensor, Tensor]] = []
    handles = [
        block.register_forward_pre_hook(
            lambda m, a, k: seen.setdefault("pre", a[0] if a else k["hidden_states"]), with_kwargs=True),
        block.register_forward_hook(lambda m, a, out: seen.setdefault("post", out)),
    ]
    children = dict(block.named_children())
    for name, child in children.items():
        handles.append(child.register_forward_hook(lambda m, a, out, _n=name: calls.append((_n, out))))
    attention = [n for n, c in children.items() if ATTENTION_NAME.search(n) and not NORM_NAME.search(type(c).__name__)]
    if len(attention) == 1:
        for name, sub in children[attention[0]].named_modules():
            if isinstance(sub, nn.Linear):
                handles.append(sub.register_forward_hook(
                    lambda m, a, out, _n=name: linear_calls.append((_n, a[0], out))))
    device = next(hf_model.parameters()).device
    try:
        hf_model.eval()(input_ids=_check_ids(config, device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    pre = seen["pre"]
    post, post_index = _tensor_of(seen["post"], pre.shape)
    if post is None:
        raise KlgapError(f"block {family.blocks}.0 of {type(hf_model).__name__} returns no tensor shaped like its input")
    names = [name for name, _ in calls]
    reasons: list[str] = []
    found = replace(family, block_output_index=post_index)

    # distinct [b pos d] outputs in call order; a child that returns an earlier child's tensor (dropout) is an alias
    distinct: list[_Call] = []
    for order, (name, out) in enumerate(calls):
        if names.count(name) > 1:
            continue  # called twice: not a sublayer
        value, index = _tensor_of(out, pre.shape)
        if value is None or any(torch.equal(value, c.value) for c in distinct):
            continue
        distinct.append(_Call(name, order, value, index, bool(NORM_NAME.search(type(children[name]).__name__))))

    delta = (post - pre).float()
    eps = torch.finfo(post.dtype).eps
    tol = 8 * eps * max(float(post.abs().max()), float(pre.abs().max()), 1.0)
    attn_out = mlp_out = attn_z = None
    if len(attention) != 1:
        reasons.append(f"no single attention submodule in a block (children: {', '.join(children)})")
    else:
        attn_order = names.index(attention[0]) if attention[0] in names else -1
        pairs = [
            (a, m) for i, a in enumerate(distinct) for m in distinct[i + 1:]
            if attn_order >= 0 and a.order >= attn_order
            and float((a.value.float() + m.value.float() - delta).abs().max()) <= tol
        ]
        if len(pairs) == 1:
            a, m = pairs[0]
            attn_out, mlp_out = Point(a.name, "output", a.index), Point(m.name, "output", m.index)
        else:
            what = "no pair" if not pairs else f"{len(pairs)} pairs"
            reasons.append(
                f"attn_out / mlp_out: {what} of block outputs add up to block output − input "
                f"(submodule calls: {', '.join(names) or 'none'})"
            )
        attn_value = next((out for name, out in calls if name == attention[0]), None)
        attn_tensor, _ = _tensor_of(attn_value, pre.shape)
        projections = [
            name for name, _, out in linear_calls
            if attn_tensor is not None and out.shape == attn_tensor.shape and torch.equal(out, attn_tensor)
        ]
        if len(projections) == 1:
            attn_z = Point(f"{attention[0]}.{projections[0]}", "input")
        else:
            reasons.append(f"attn_z: no single linear layer of {attention[0]} gives its output")
    note = family.note + (
        f"; attn_out = {attn_out.describe()}, mlp_out = {mlp_out.describe()} (block output − input = their sum "
        "on a check forward)" if attn_out and mlp_out else ""
    )
    return replace(found, attn_out=attn_out, mlp_out=mlp_out, attn_z=attn_z, note=note, unmapped="; ".join(reasons))


def attn_z_width(hf_model: nn.Module, family: Family) -> int | None:
    """in_features of the attention output projection the generic map found (None when it found none)."""
    if family.attn_z is None:
        return None
    proj = hf_model.get_submodule(f"{family.blocks}.0.{family.attn_z.module}")
    return int(proj.in_features) if isinstance(proj, nn.Linear) else None
