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
   is the attention output; ``mlp_in`` the input of the module giving mlp_out or, when that module is a post-norm,
   of the child whose output it normalises (the MLP). Anything else is refused with a message naming what was found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from klgap.errors import KlgapError
from klgap_hf.families import Family, Point, dims

ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
NORM_NAME = re.compile(r"norm|ln", re.IGNORECASE)
NOT_A_SUBLAYER = re.compile(r"norm|dropout|identity", re.IGNORECASE)  # class names
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
    """The norm next to the blocks (same parent, 'norm' / 'ln' in its name; one named final*, norm or ln_f wins);
    '' when there is not exactly one. The engine checks the suffix replay that uses it against full forwards."""
    parent_path = blocks.rsplit(".", 1)[0] if "." in blocks else ""
    parent = hf_model.get_submodule(parent_path) if parent_path else hf_model
    norms = [name for name, child in parent.named_children()
             if NORM_NAME.search(name) and not isinstance(child, nn.ModuleList)]
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
    """One direct child of a block as the check forward called it."""

    name: str
    order: int
    value: Tensor  # the [b pos d] tensor it returned (a copy: a block may add into it in place)
    index: int | None  # its place in a tuple output (None: the output is the tensor)


@dataclass
class _Found:
    """What the check forward showed for one kind of block."""

    attn_out: Point | None = None
    mlp_out: Point | None = None
    attn_z: Point | None = None
    mlp_in: Point | None = None
    z_width: int | None = None
    block_output_index: int | None = None
    reasons: list[str] = field(default_factory=list)


def _tensor_of(output: Any, shape: torch.Size) -> tuple[Tensor | None, int | None]:
    if isinstance(output, Tensor):
        return (output, None) if output.shape == shape else (None, None)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor) and output[0].shape == shape:
        return output[0], 0
    return None, None


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _check_ids(config: Any, device: torch.device) -> Tensor:
    vocab = dims(config)["vocab_size"]
    return (torch.arange(1, 9) % vocab).unsqueeze(0).to(device)


def _kinds(blocks: nn.ModuleList) -> dict[tuple[str, ...], list[int]]:
    """Blocks grouped by their children (name, class): one kind for most models, several for hybrid ones."""
    kinds: dict[tuple[str, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        kinds.setdefault(tuple(f"{n}:{type(c).__name__}" for n, c in block.named_children()), []).append(i)
    return kinds


class _Recorder:
    """Hooks on one block, its direct children and its attention module's leaves, recording one forward pass."""

    def __init__(self, block: nn.Module) -> None:
        self.children = dict(block.named_children())
        self.attention = [n for n, c in self.children.items()
                          if ATTENTION_NAME.search(n) and not NOT_A_SUBLAYER.search(type(c).__name__)]
        self.seen: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []
        self.inputs: dict[str, Any] = {}  # each direct child's first input (its first call)
        self.leaves: list[tuple[str, Any, Any]] = []
        self.handles = [block.register_forward_pre_hook(self._input, with_kwargs=True),
                        block.register_forward_hook(self._output)]
        for name, child in self.children.items():
            self.handles.append(child.register_forward_hook(self._child(name)))
        if len(self.attention) == 1:
            for name, sub in self.children[self.attention[0]].named_modules():
                if name and not any(True for _ in sub.children()):  # leaves: projections, dropouts, ...
                    self.handles.append(sub.register_forward_hook(self._leaf(name)))

    def _input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen.setdefault("pre", _copy(args[0] if args else kwargs["hidden_states"]))

    def _output(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.seen.setdefault("post", _copy(out))

    def _child(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            self.calls.append((name, _copy(out)))
            if args:
                self.inputs.setdefault(name, _copy(args[0]))

        return hook

    def mlp_input(self, mlp_out: _Call) -> Point | None:
        """mlp_in: the input of the module whose output is mlp_out; where that module is a post-norm (Gemma 2/3,
        OLMo 2), the input of the child called before it whose output the norm normalises (the MLP)."""
        if not NORM_NAME.search(mlp_out.name):
            return Point(mlp_out.name, "input")
        normed = self.inputs.get(mlp_out.name)
        for name, out in reversed(self.calls[: mlp_out.order]):
            value, _ = _tensor_of(out, normed.shape) if isinstance(normed, Tensor) else (None, None)
            if value is not None and torch.equal(value, normed) and not NORM_NAME.search(name):
                return Point(name, "input")
        return None

    def _leaf(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            self.leaves.append((name, _copy(args[0]) if args else None, _copy(out)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def found(self, where: str) -> _Found:
        """attn_out / mlp_out (the one pair of child outputs that adds up to block output − input, the first at or
        after the attention module) and attn_z (the attention leaf that turns the heads into its output)."""
        pre = self.seen["pre"]
        post, post_index = _tensor_of(self.seen["post"], pre.shape)
        if post is None:
            raise KlgapError(f"block {where} returns no tensor shaped like its input {tuple(pre.shape)}")
        result = _Found(block_output_index=post_index)
        names = [name for name, _ in self.calls]
        if len(self.attention) != 1:
            result.reasons.append(f"no single attention submodule in {where} (children: {', '.join(self.children)})")
            return result
        attention = self.attention[0]
        # distinct [b pos d] outputs in call order; a child returning an earlier child's tensor (dropout) is an alias
        distinct: list[_Call] = []
        for order, (name, out) in enumerate(self.calls):
            value, index = _tensor_of(out, pre.shape)
            if names.count(name) > 1 or value is None or any(torch.equal(value, c.value) for c in distinct):
                continue
            distinct.append(_Call(name, order, value, index))
        delta = (post - pre).double()
        tol = 8 * torch.finfo(post.dtype).eps * max(float(post.abs().max()), float(pre.abs().max()), 1.0)
        start = names.index(attention) if attention in names else len(names)
        pairs = [(a, m) for i, a in enumerate(distinct) for m in distinct[i + 1:]
                 if a.order >= start and float((a.value.double() + m.value.double() - delta).abs().max()) <= tol]
        if len(pairs) == 1:
            a, m = pairs[0]
            result.attn_out, result.mlp_out = Point(a.name, "output", a.index), Point(m.name, "output", m.index)
            result.mlp_in = self.mlp_input(m)
            if result.mlp_in is None:
                result.reasons.append(f"mlp_in: no submodule of {where} gives the input of {m.name} (mlp_out)")
        else:
            what = "no pair" if not pairs else f"{len(pairs)} pairs"
            result.reasons.append(f"attn_out / mlp_out: {what} of {where}'s submodule outputs add up to its output − "
                                  f"input (submodule calls: {', '.join(names) or 'none'})")
        attn_tensor, _ = _tensor_of(next((out for name, out in self.calls if name == attention), None), pre.shape)
        # the output projection: the leaf whose output is the attention output and whose input is not (a dropout's is)
        projections = [
            (name, inp) for name, inp, out in self.leaves
            if attn_tensor is not None and isinstance(out, Tensor) and out.shape == attn_tensor.shape
            and torch.equal(out, attn_tensor) and isinstance(inp, Tensor) and inp.dim() == 3
            and not (inp.shape == out.shape and torch.equal(inp, out))
        ]
        if len(projections) == 1:
            result.attn_z = Point(f"{attention}.{projections[0][0]}", "input")
            result.z_width = int(projections[0][1].shape[-1])
        else:
            result.reasons.append(f"attn_z: no single layer of {attention} gives its output from the heads")
        return result


def _agree(kinds: dict[tuple[str, ...], list[int]], found: list[_Found], site: str) -> tuple[Any, str]:
    """The point every kind of block gives `site`, or None and why not."""
    values = [getattr(f, site) for f in found]
    if all(v == values[0] for v in values):
        return values[0], ""
    where = "; ".join(f"layers {_span(layers)}: {v.describe() if isinstance(v, Point) else v}"
                      for layers, v in zip(kinds.values(), values, strict=True))
    return None, f"{site} differs between the kinds of block ({where})"


def _span(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if len(layers) <= 6 else f"{','.join(map(str, layers[:6]))},..."


@torch.no_grad()
def identify_sublayers(hf_model: nn.Module, family: Family, config: Any) -> Family:
    """`family` (from :func:`infer_family`) with attn_out / mlp_out / attn_z mapped where one forward pass shows
    them unambiguously; the reasons for anything left unmapped go into ``unmapped``.

    A hybrid model (blocks of several kinds, e.g. linear- and full-attention layers) is checked on one block of
    each kind; a site is mapped only where every kind puts it at the same module path."""
    blocks = hf_model.get_submodule(family.blocks)
    kinds = _kinds(blocks)
    recorders = [_Recorder(blocks[layers[0]]) for layers in kinds.values()]
    device = next(hf_model.parameters()).device
    try:
        hf_model.eval()(input_ids=_check_ids(config, device), use_cache=False)
    finally:
        for recorder in recorders:
            recorder.remove()
    found = [r.found(f"{family.blocks}.{layers[0]}") for r, layers in zip(recorders, kinds.values(), strict=True)]
    reasons = list(dict.fromkeys(reason for f in found for reason in f.reasons))
    points: dict[str, Any] = {}
    for site in ("attn_out", "mlp_out", "attn_z", "mlp_in", "z_width", "block_output_index"):
        points[site], why = _agree(kinds, found, site)
        if why and site not in ("z_width", "block_output_index"):
            reasons.append(why)
    if points["block_output_index"] is None and any(f.block_output_index is not None for f in found):
        raise KlgapError(f"the blocks of {type(hf_model).__name__} return their hidden states in different places")
    note = family.note
    if points["attn_out"] and points["mlp_out"]:
        note += (f"; attn_out = {points['attn_out'].describe()}, mlp_out = {points['mlp_out'].describe()} (block "
                 "output − input = their sum on a check forward)")
    elif points["mlp_out"]:
        note += f"; mlp_out = {points['mlp_out'].describe()} (checked on a forward pass)"
    return replace(family, attn_out=points["attn_out"], mlp_out=points["mlp_out"], attn_z=points["attn_z"],
                   mlp_in=points["mlp_in"],
                   attn_z_width=points["z_width"] if points["attn_z"] else None,
                   block_output_index=points["block_output_index"], note=note, unmapped="; ".join(reasons))
