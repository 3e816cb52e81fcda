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


def test_every_register_hook_fills_a_registry():
    registering = {name for name in _hookspecs() if name.startswith("register_")}
    assert registering and registering == set(hookspecs.REGISTRY_HOOKS)


@pytest.mark.parametrize("hook", _hookspecs())
def test_hookspec_docstring_documents_arguments_and_example(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook}: argument {param!r} is not documented"
    assert "Example::" in doc and f"def {hook}(" in doc, f"{hook}: its docstring has no example"


def _contributing_section(hook: str) -> str | None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    match = re.search(rf"^### `{hook}`\n(.*?)(?=^#{{1,3}} |\Z)", text, flags=re.M | re.S)
    return match.group(1) if match else None


@pytest.mark.parametrize("hook", _hookspecs())
def test_contributing_documents_the_hook(hook):
    section = _contributing_section(hook)
    assert section is not None, f"CONTRIBUTING.md has no '### `{hook}`' section"
    for param in inspect.signature(getattr(hookspecs, hook)).parameters:
        documented = f"**{param}(" in section or f"**{param}**" in section
        assert documented, f"CONTRIBUTING.md: the {hook} section does not document its argument {param!r}"
    assert f"def {hook}(" in section, f"CONTRIBUTING.md: the {hook} section has no example"
    if getattr(hookspecs, hook).klgap_spec.get("firstresult"):
        assert "firstresult" in section, f"CONTRIBUTING.md: the {hook} section does not say it is firstresult"


def test_contributing_lists_every_fault_with_its_message():
    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text[text.index("### Bad input and faults"):text.index("### Adding a hook")]
    for message in ("has non-finite weights: W_dec has 1 NaN", "the model's clean logits hold",
                    "measuring it again", "was not written: File too large", "were not all written",
                    "is not interventions.sae.kl_mean", "cfg.json lacks d_in", "is a file, not a folder",
                    "is in use by another klgap run", "BROKEN:", "klgap measures transcoders that read the MLP's input", "give --site and --layer",
                    "klgap compare", "train-sae", "gave 3 contexts of 32 tokens", "lacks batches", "is not the one it "
                    "measured", "is a folder klgap did not write", "unknown [train_sae] key", "cannot load the weights",
                    "outside tiny-gpt2's vocabulary", "lists layer 0 twice", "is below its uncorrected p_value"):
        assert message in table, f"CONTRIBUTING.md's bad-input table lacks {message!r}"


def test_every_row_of_the_bad_input_table_names_a_test_that_exists():
    """Each case in CONTRIBUTING's table of bad inputs and faults names its test (file, or file::test name with
    `*` for the rest of the name), and that test exists."""
    import fnmatch
    import re

    text = (ROOT / "CONTRIBUTING.md").read_text()
    table = text[text.index("### Bad input and faults"):text.index("### Adding a hook")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) >= 25
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)(?:::([\w*]+)(?:\[[^\]]*\])?)?`", row.rsplit("|", 2)[-2])
        assert cited, f"no test named for: {row[:80]}"
        for file, name in cited:
            assert (ROOT / file).is_file(), file
            if name:
                tests = re.findall(r"^def (test\w+)", (ROOT / file).read_text(), flags=re.M)
                assert fnmatch.filter(tests, name), f"{file} has no test {name}"
