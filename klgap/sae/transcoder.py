"""Transcoders: substitutes that read one site and write another (the MLP's input -> its output).

A transcoder replaces a whole MLP: it reads ``mlp_in`` (the MLP's input, after the pre-MLP norm) and predicts
``mlp_out``. Its :class:`klgap.protocols.LoadedSAE` has ``reads="mlp_in"``, ``hook_name`` the hook it writes
(``blocks.L.hook_mlp_out``, which picks the run's site and layer), ``d_out`` and, for a skip transcoder, ``skip``
(``W_skip [d_out d_in]``). The engine patches ``mlp_out`` with its output from the clean ``mlp_in`` of the same
tokens, so every intervention and baseline is built around the true MLP output with the transcoder's error.

The ecosystem names the read hook in several ways (sae_lens ``blocks.L.ln2.hook_normalized``, Gemma Scope 2
``blocks.L.hook_mlp_in``, ``blocks.L.mlp.hook_in``); :func:`written_hook` reads any of them as mlp_in.
"""

from __future__ import annotations

import re

from klgap.errors import KlgapError
from klgap.plan.sites import hook_name

#: The site every transcoder reads and the one it writes.
READS, WRITES = "mlp_in", "mlp_out"

_READ_HOOK = re.compile(r"^blocks\.(?P<layer>\d+)\.(?:ln2\.hook_normalized|hook_mlp_in|mlp\.hook_in)$")


def reads_mlp_in(hook: str | None) -> bool:
    """Whether `hook` names the MLP's input (any of the ecosystem's names for it)."""
    return hook is not None and _READ_HOOK.match(hook.strip()) is not None


def written_hook(read_hook: str | None, out_hook: str | None, where: str) -> str | None:
    """The hook a transcoder writes (``blocks.L.hook_mlp_out``), from the hook it reads (`read_hook`, e.g.
    ``blocks.L.ln2.hook_normalized``) and the one its config names as its output (`out_hook`, may be None: then
    the MLP output of the same layer). None when neither says (give --site mlp_out and --layer). A transcoder of
    another pair of sites (e.g. attention's) is refused, naming it."""
    layer = None
    if read_hook is not None:
        match = _READ_HOOK.match(read_hook.strip())
        if match is None:
            raise KlgapError(f"{where} reads {read_hook}; klgap measures transcoders that read the MLP's input "
                             "(blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_in) and write its output "
                             "(blocks.L.hook_mlp_out)")
        layer = int(match["layer"])
    if out_hook is None:
        return None if layer is None else hook_name(WRITES, layer)
    expected = re.match(r"^blocks\.(?P<layer>\d+)\.hook_mlp_out$", out_hook.strip())
    if expected is None or (layer is not None and int(expected["layer"]) != layer):
        raise KlgapError(f"{where} writes {out_hook} from {read_hook}; klgap measures transcoders that replace one "
                         "MLP: they read blocks.L.ln2.hook_normalized and write blocks.L.hook_mlp_out of the same L")
    return out_hook.strip()


__all__ = ["READS", "WRITES", "reads_mlp_in", "written_hook"]
