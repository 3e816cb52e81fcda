"""What the command line says about itself (issue 35): --sae names every SAE loader the registry holds, `klgap
curve --help` gives curve's own interventions, `new-plugin`'s next step installs the tests' extra and its README
has no placeholder link, and every token source is described in one set of words (`klgap plugins` = README)."""

from __future__ import annotations

import re
from pathlib import Path

from klgap.cli.args import build_parser
from klgap.cli.main import main
from klgap.plugins.manager import get_host, registry
from klgap.testing import use_plugin

ROOT = Path(__file__).parents[2]


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return " ".join(sub.format_help().split())


def test_sae_help_names_every_registered_loader_plugins_included():
    import types

    import klgap

    plugin = types.ModuleType("klgap_help_probe")

    class Loader:
        description = "a probe"

    @klgap.hookimpl
    def register_sae_loaders(register):
        register("probe_loader", Loader(), Loader.description)

    plugin.register_sae_loaders = register_sae_loaders
    use_plugin("help_probe", plugin)
    try:
        names = registry("sae_loader").names()
        assert {"sae_lens", "sparsify", "dictionary_learning", "safetensors", "probe_loader"} <= set(names)
        for command in ("replicate", "curve"):
            text = _help(command)
            assert f"LOADER one of {', '.join(sorted(names))}" in text, text
    finally:
        get_host().remove_plugin("help_probe")
    assert "probe_loader" not in registry("sae_loader").names()


def test_curve_help_gives_curves_own_interventions():
    curve, replicate = _help("curve"), _help("replicate")
    assert ("added to sae, epsilon_random and the cosine_matched grid of --cos × --norm-frac (default: none added, or a "
            "--config file's `interventions`)") in curve
    assert "sae_norm_corrected" not in curve and "(default sae, sae_norm_corrected, sae_norm," in replicate


def test_new_plugin_next_step_and_readme(tmp_path, capsys):
    assert main(["new-plugin", "my_noise", "--dir", str(tmp_path / "pkg")]) == 0
    out = capsys.readouterr().out
    assert f"next: pip install -e '{tmp_path / 'pkg'}[test]' && klgap plugins && pytest {tmp_path / 'pkg' / 'tests'}" in out
    readme = (tmp_path / "pkg" / "README.md").read_text()
    assert "example.invalid" not in readme and 'pip install -e ".[test]"' in readme
    assert not re.search(r"https?://", readme)  # no link to a page that is not there


def test_each_token_source_has_one_description():
    readme = " ".join((ROOT / "README.md").read_text().split())
    sources = registry("token_source")
    for name in ("sample", "text", "hf", "random"):
        description = " ".join(sources.entries[name].description.split())
        assert f"- `{name}`: {description}" in readme, (name, description)
    assert "English prose from the docstrings of Python's standard library" in sources.entries["sample"].description
