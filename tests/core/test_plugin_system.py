"""The plugin manager: duplicate names refused, failures reported by plugin name, entry points found."""

from __future__ import annotations

import pytest

import klgap
from klgap.errors import PluginError
from klgap.plugins.manager import PluginHost, get_host


class _Perturbation:
    name = "plus_one"
    stochastic = False
    geometry: dict = {}

    def __call__(self, x, x_hat, generator):
        return x + 1


class PluginA:
    @klgap.hookimpl
    def register_perturbations(self, register):
        register("plus_one", _Perturbation, "x' = x + 1")


class PluginB:
    @klgap.hookimpl
    def register_perturbations(self, register):
        register("plus_one", _Perturbation, "the same name again")


class Raising:
    @klgap.hookimpl
    def register_model_adapters(self, register):
        raise RuntimeError("boom")


class BadName:
    @klgap.hookimpl
    def register_token_sources(self, register):
        register("has space", object())


class Misspelled:
    @klgap.hookimpl
    def register_perturbation(self, register):  # no such hook
        pass


def test_registers_and_describes():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(PluginA(), "a", package="pkg-a", version="1.2")
    entry = host.registry("perturbation").entries["plus_one"]
    assert (entry.plugin, entry.description) == ("a", "x' = x + 1")
    [info] = [i for i in host.plugin_infos() if i.package != "klgap"]  # the core's own plugins are always there
    assert (info.name, info.package, info.version, info.registers) == ("a", "pkg-a", "1.2", {"perturbation": ["plus_one"]})


def test_duplicate_name_refused_naming_both_plugins():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(PluginA(), "a")
    host.add_plugin(PluginB(), "b")
    with pytest.raises(PluginError, match=r"'plus_one' is registered twice.*'a'.*'b'|'plus_one' is registered twice.*'b'.*'a'"):
        host.registry("perturbation")


def test_raising_plugin_reported_by_name():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(Raising(), "raising-plugin")
    with pytest.raises(PluginError, match=r"plugin 'raising-plugin' raised in register_model_adapters: RuntimeError: boom"):
        host.registry("model")


def test_bad_name_refused():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(BadName(), "bad")
    with pytest.raises(PluginError, match="'has space'"):
        host.registry("token_source")


def test_misspelled_hook_fails_loudly():
    host = PluginHost(load_entry_points=False)
    with pytest.raises(PluginError, match="'typo'"):
        host.add_plugin(Misspelled(), "typo")


def test_unknown_name_suggests():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(PluginA(), "a")
    with pytest.raises(klgap.errors.KlgapError, match=r"unknown perturbation 'plus_on' \(did you mean 'plus_one'\?\)"):
        host.registry("perturbation").get("plus_on")


def test_builtin_plugins_arrive_through_entry_points():
    host = get_host()
    infos = {info.name: info for info in host.plugin_infos()}
    for name in ("hf_models", "sae_loaders", "perturbations", "token_sources"):
        assert infos[name].package == "klgap"
        assert infos[name].version == klgap.__version__
    assert {"tiny-gpt2", "tiny-pythia", "tiny-llama", "smollm2-135m", "gpt2", "pythia-70m"} <= set(
        infos["hf_models"].registers["model"]
    )
    assert {"sae", "epsilon_random", "theta_random", "cosine_matched"} <= set(infos["perturbations"].registers["perturbation"])
    assert {"sae_lens", "sae_lens_disk", "safetensors"} <= set(infos["sae_loaders"].registers["sae_loader"])
    assert {"sample", "text", "random"} <= set(infos["token_sources"].registers["token_source"])


def test_a_plugin_that_raises_while_registering_is_listed_broken_and_blocks_lookups():
    host = PluginHost(load_entry_points=False)
    host.add_plugin(PluginA(), "a")
    host.add_plugin(Raising(), "raising-plugin")
    infos = {info.name: info for info in host.plugin_infos()}  # listing never raises
    assert infos["a"].error is None and infos["a"].registers == {"perturbation": ["plus_one"]}
    assert "raised in register_model_adapters: RuntimeError: boom" in infos["raising-plugin"].error
    assert infos["raising-plugin"].registers == {}
    with pytest.raises(PluginError, match="KLGAP_DISABLE_PLUGINS=raising-plugin to skip it"):
        host.registry("perturbation")
