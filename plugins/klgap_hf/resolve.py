"""A ``--model`` value that is not a registered name -> an adapter: a local model folder or a hub repo id.

``resolve_model_adapter`` (klgap's firstresult hook) calls :func:`resolve`; nothing is loaded here.

==========================  ================================================================================
``./my-qwen2`` (a folder)   :class:`klgap_hf.folder.FolderAdapter`: what ``save_pretrained`` wrote
``EleutherAI/pythia-1b``    :class:`klgap_hf.hub.HubAdapter` (HF cache first, then the hub)
anything else               None: klgap reports an unknown model, listing the registered names
==========================  ================================================================================

A folder wins over a hub repo of the same name, as in ``from_pretrained``. A value written as a path (``./x``,
``/x``, ``~/x``, ``x/``, or with more than one ``/``) that is not a folder is an error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

from klgap.errors import KlgapError
from klgap_hf.folder import FolderAdapter
from klgap_hf.hub import HubAdapter, adapter_for_repo

#: ORG/NAME as the hub spells repo ids (letters, digits, '-', '_', '.'; no leading '.' or '-').
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_path(spec: str) -> bool:
    """True when `spec` can only be meant as a filesystem path."""
    return (spec.startswith(("./", "../", "/", "~", ".\\")) or spec.endswith(("/", "\\")) or spec in (".", "..")
            or spec.count("/") > 1 or "\\" in spec)


def resolve(spec: str) -> FolderAdapter | HubAdapter | None:
    """The adapter of a folder or hub repo id, None for anything else; KlgapError for a path that is no model
    folder (missing, or without config.json)."""
    text = spec.strip()
    if not text:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        return FolderAdapter(path)
    if looks_like_path(text):
        if path.exists():
            raise KlgapError(f"--model {spec!r} is a file; give the folder that holds config.json and the weights")
        raise KlgapError(f"model folder {spec!r} does not exist (a --model value is a registered name, a hub repo "
                         "id ORG/NAME or a folder saved with save_pretrained)")
    if REPO_ID.match(text):
        return adapter_for_repo(text, name=text)
    return None
