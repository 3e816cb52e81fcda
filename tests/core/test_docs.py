"""Every hook is documented: in its docstring (arguments + example) and in CONTRIBUTING.md's hook reference."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from klgap import hookspecs

ROOT = Path(__file__).parents[2]


def _hookspecs() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, f"{hookspecs.PROJECT}_spec")]


def _firstresult(hook: str) -> bool:
    return bool(getattr(getattr(hookspecs, hook), f"{hookspecs.PROJECT}_spec").get("firstresult"))


def test_every_hookspec_fills_a_registry_or_answers_a_question():
    """register_* hooks fill a registry; firstresult hooks (resolve_model_adapter) answer a question instead."""
    assert _hookspecs() and {h for h in _hookspecs() if not _firstresult(h)} == set(hookspecs.REGISTRY_HOOKS)
    assert {h for h in _hookspecs() if _firstresult(h)} == {"resolve_model_adapter"}


@pytest.mark.parametrize("hook", _hookspecs())
def test_hookspec_docstring_documents_arguments_and_example(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook}: argument {param!r} is not documented"
    assert "Example::" in doc and f"def {hook}(" in doc, f"{hook}: its docstring has no example"


@pytest.mark.parametrize("hook", _hookspecs())
def test_contributing_documents_the_hook(hook):
    text = (ROOT / "CONTRIBUTING.md").read_text()
    match = re.search(rf"^### `{hook}`\n(.*?)(?=^#{{1,3}} |\Z)", text, flags=re.M | re.S)
    assert match, f"CONTRIBUTING.md has no '### `{hook}`' section"
    section = match.group(1)
    first = next(iter(inspect.signature(getattr(hookspecs, hook)).parameters))
    assert f"**{first}" in section, f"CONTRIBUTING.md: the {hook} section does not document its argument"
    assert f"def {hook}(" in section, f"CONTRIBUTING.md: the {hook} section has no example"
