"""Every hook is implemented somewhere and works through the host; the core imports no built-in plugin; built-in
plugins are cheap to import (the CLI imports all of them to build its parser)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import klgap
from klgap import hookspecs
from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.plugins.manager import CORE_PLUGINS, get_host, model_adapter, reset_host
from klgap.protocols import Command

ROOT = Path(__file__).parents[2]
BUILTIN = ("klgap_hf", "klgap_saes", "klgap_perturbations", "klgap_tokens", "klgap_sparsify", "klgap_dictionary_learning")
#: libraries that take seconds to import; a plugin imports them inside the functions that use them.
HEAVY = ("transformers", "sae_lens", "datasets", "nnsight")


# ----------------------------------------------------------------------------- test plugins


class _Adapter:
    description = "a model named by a test-org/ repo id (never loaded)"

    def __init__(self, name: str) -> None:
        self.name = name

    def load(self, device, dtype):
        raise AssertionError("resolve_model_adapter must not load the model")


class _Resolver:
    """resolve_model_adapter: answers `test-org/NAME`, records every spec it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @klgap.hookimpl
    def resolve_model_adapter(self, spec):
        self.asked.append(spec)
        return _Adapter(spec) if spec.startswith("test-org/") else None


class _Echo:
    description = "print a word (a test command)"

    def add_arguments(self, parser):
        parser.add_argument("word")
        parser.add_argument("--times", type=int, default=1)

    def run(self, args):
        if args.word == "bad":
            raise KlgapError("echo-test: 'bad' is not a word to echo; any other word is")
        print(" ".join([args.word] * args.times))
        return 0


class _Commands:
    @klgap.hookimpl
    def register_commands(self, register):
        register("echo-test", _Echo())


class _Shadowing:
    @klgap.hookimpl
    def register_commands(self, register):
        register("replicate", _Echo(), "a plugin command that takes a core command's name")


#: hook -> a plugin class in this file that implements it (for hooks no built-in plugin implements yet)
TEST_PLUGINS = {"resolve_model_adapter": _Resolver, "register_commands": _Commands}


@pytest.fixture
def with_plugin():
    """``with_plugin(obj, name)`` adds a plugin to the process-wide host; the host is rebuilt afterwards."""
    reset_host()

    def add(plugin, name):
        get_host().add_plugin(plugin, name)
        return plugin

    yield add
    reset_host()


# ----------------------------------------------------------------------------- every hook is implemented


def _hookspecs() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, f"{hookspecs.PROJECT}_spec")]


def _builtin_entry_points() -> set[str]:
    return {ep.name for ep in entry_points(group=hookspecs.PROJECT) if ep.value.split(".")[0].split(":")[0] in BUILTIN}


@pytest.mark.parametrize("hook", _hookspecs())
def test_every_hook_is_implemented_by_a_builtin_or_test_plugin(hook):
    implementers = {impl.plugin_name for impl in getattr(get_host().pm.hook, hook).get_hookimpls()}
    if implementers & (_builtin_entry_points() | set(CORE_PLUGINS)):  # the core's own plugins count as built in
        return
    plugin = TEST_PLUGINS.get(hook)
    assert plugin is not None, f"no built-in plugin implements {hook} and no test plugin here does"
    assert hasattr(getattr(plugin, hook), f"{hookspecs.PROJECT}_impl"), f"{plugin.__name__}.{hook} is not a hookimpl"


def test_resolve_model_adapter_answers_unregistered_names_only(with_plugin):
    resolver = with_plugin(_Resolver(), "test-resolver")
    ref = model_adapter("test-org/tiny-thing")
    assert (ref.name, ref.plugin, type(ref.adapter)) == ("test-org/tiny-thing", "test-resolver", _Adapter)
    assert model_adapter("tiny-gpt2").plugin == "hf_models"  # a registered name never reaches the hook
    with pytest.raises(KlgapError, match="unknown model 'no-such-model'"):
        model_adapter("no-such-model")
    assert resolver.asked == ["test-org/tiny-thing", "no-such-model"]


def test_plugin_command_runs_through_the_cli(with_plugin, capsys):
    with_plugin(_Commands(), "test-commands")
    assert main(["echo-test", "hello", "--times", "2"]) == 0
    assert capsys.readouterr().out == "hello hello\n"
    assert main(["echo-test", "bad"]) == 2
    err = capsys.readouterr().err
    assert err == "klgap: error: echo-test: 'bad' is not a word to echo; any other word is\n"
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "test-commands" in listing and "echo-test" in listing and "print a word (a test command)" in listing


def test_plugin_command_may_not_take_a_core_name(with_plugin, capsys):
    with_plugin(_Shadowing(), "test-shadowing")
    assert main(["plugins"]) == 0  # listed as broken
    assert "BROKEN: plugin 'test-shadowing' registers command 'replicate', which klgap itself defines" in capsys.readouterr().out
    assert main(["validate", "x"]) == 2  # every other command names it
    err = capsys.readouterr().err
    assert "registers command 'replicate', which klgap itself defines" in err
    assert "KLGAP_DISABLE_PLUGINS=test-shadowing" in err


def test_build_corpus_is_the_token_source_plugins_command(capsys):
    entry = get_host().registry("command").entries["build-corpus"]
    assert entry.plugin == "token_sources" and isinstance(entry.obj, Command)
    assert main(["plugins", "--json"]) == 0
    infos = {info["name"]: info for info in json.loads(capsys.readouterr().out)}
    assert infos["token_sources"]["registers"]["command"] == ["build-corpus"]
    assert main(["plugins"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("token_sources"):]
    assert "  command:\n    build-corpus" in section


# ----------------------------------------------------------------------------- the core imports no plugin


def plugin_imports(source: str, filename: str = "<source>") -> list[str]:
    """`module (line N)` for every import of a built-in plugin in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in BUILTIN]
    return [f"{name} (line {line})" for line, name in sorted(found)]


def test_the_scanner_finds_plugin_imports():
    source = "import os\nfrom klgap.errors import KlgapError\ndef f():\n    from klgap_saes.disk import X\n" \
             "import klgap_hf as hf\n'import klgap_tokens'  # a string, not an import\n"
    assert plugin_imports(source) == ["klgap_saes.disk (line 4)", "klgap_hf (line 5)"]


def test_core_imports_no_builtin_plugin():
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "klgap").rglob("*.py"))
        if (found := plugin_imports(path.read_text(), str(path)))
    }
    assert not offenders, f"klgap/ must not import built-in plugins (give the code a home in the core): {offenders}"


# ----------------------------------------------------------------------------- plugins are cheap to import


def test_builtin_plugins_import_no_heavy_library():
    mine = [name for name in BUILTIN if name != "klgap_hf"]  # klgap_hf wraps transformers models itself
    code = (f"import sys\nimport {', '.join(mine)}\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "", f"importing {', '.join(mine)} imported {result.stdout.strip()}"
