"""Optional plugin capabilities are declared protocols (klgap.protocols) asked through klgap.plugins.capabilities."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import klgap
from klgap.plugins.capabilities import (as_perturbation, check_sae_spec, find_default_sae, fit_summary, fittable,
                                sae_fittable)
from klgap.cli.main import main
from klgap.errors import KlgapError, PluginError
from klgap.plugins.manager import Registry, get_host, reset_host
from klgap.protocols import DefaultSAEFinder, FittablePerturbation, SAECheck, SAEChecker, SaeFittablePerturbation
from tests.helpers import FakeModel


class _Plain:
    description = "loads, checks nothing"

    def can_load(self, spec):
        return False

    def load(self, spec, device):
        raise AssertionError


class _Checker(_Plain):
    def check(self, spec):
        return SAECheck(hook_name=f"blocks.{spec}.hook_mlp_out", detail="test")


class _DictChecker(_Plain):
    def check(self, spec):
        return {"hook_name": "blocks.0.hook_mlp_out"}  # the old, undeclared shape of the answer


class _Finder(_Plain):
    def __init__(self, answer):
        self.answer = answer

    def default_sae(self, model, site, layer):
        return self.answer(site, layer)


def test_sae_checker_is_asked_only_when_declared():
    assert not isinstance(_Plain(), SAEChecker) and isinstance(_Checker(), SAEChecker)
    assert check_sae_spec(_Plain(), "3") is None
    assert check_sae_spec(_Checker(), "3") == SAECheck("blocks.3.hook_mlp_out", detail="test")
    with pytest.raises(PluginError, match=r"_DictChecker.check\('x'\) returned a dict; it must return klgap.protocols.SAECheck"):
        check_sae_spec(_DictChecker(), "x")


def test_default_sae_comes_from_the_first_finder_that_knows_one():
    loaders = Registry("sae_loader")
    loaders.add("p", "plain", _Plain())
    loaders.add("p", "mlp_only", _Finder(lambda site, layer: (f"rel/{site}.{layer}", "from mlp_only") if site == "mlp_out" else None))
    loaders.add("p", "any", _Finder(lambda site, layer: ("rel/any", "from any")))
    assert not isinstance(_Plain(), DefaultSAEFinder) and isinstance(_Finder(None), DefaultSAEFinder)
    model = FakeModel()
    assert find_default_sae(loaders, model, "mlp_out", 2) == ("mlp_only:rel/mlp_out.2", "from mlp_only")
    assert find_default_sae(loaders, model, "resid_pre", 2) == ("any:rel/any", "from any")
    lonely = Registry("sae_loader")
    lonely.add("p", "plain", _Plain())
    assert find_default_sae(lonely, model, "mlp_out", 0) is None
    bad = Registry("sae_loader")
    bad.add("p", "bad", _Finder(lambda site, layer: "rel/only-a-spec"))
    with pytest.raises(PluginError, match=r"SAE loader 'bad': default_sae returned 'rel/only-a-spec'"):
        find_default_sae(bad, model, "mlp_out", 0)


class _Noise:
    name, stochastic, geometry = "noise", True, {}

    def __call__(self, x, x_hat, generator):
        return x + torch.randn(x.shape, generator=generator)


class _Fitted(_Noise):
    name = "fitted"

    def fit(self, acts):
        self.scale = acts.std()


class _Nameless:
    stochastic = False

    def __call__(self, x, x_hat, generator):
        return x


def test_fittable_and_as_perturbation():
    plain, fitted = _Noise(), _Fitted()
    assert fittable([None, plain, fitted]) == [fitted] and isinstance(fitted, FittablePerturbation)
    assert as_perturbation(plain, "noise") is plain
    with pytest.raises(PluginError, match=r"intervention 'nameless': its factory returned a _Nameless without name, geometry"):
        as_perturbation(_Nameless(), "nameless")


class _SaeFitted(_Noise):
    name = "sae_fitted"

    def fit_sae(self, x, x_hat, l0, d_sae):
        self.width = d_sae

    def fit_summary(self):
        return {"width": self.width, "wide": self.width > 10}


class _BadSummary(_Noise):
    def fit_summary(self):
        return {"k": [1, 2]}


def test_sae_fittable_and_fit_summary():
    plain, fitted = _Noise(), _SaeFitted()
    assert sae_fittable([None, plain, _Fitted(), fitted]) == [fitted] and isinstance(fitted, SaeFittablePerturbation)
    fitted.fit_sae(None, None, None, 16)
    assert fit_summary(fitted) == {"width": 16, "wide": True} and fit_summary(plain) == {}
    with pytest.raises(PluginError, match=r"_BadSummary.fit_summary\(\) returned \{'k': \[1, 2\]\}; it must return a dict"):
        fit_summary(_BadSummary())


class _NamelessPlugin:
    @klgap.hookimpl
    def register_perturbations(self, register):
        register("nameless", _Nameless, "a perturbation that does not declare itself")


@pytest.fixture
def with_nameless():
    reset_host()
    get_host().add_plugin(_NamelessPlugin(), "nameless-plugin")
    yield
    reset_host()


def test_an_undeclared_perturbation_fails_on_the_command_line(with_nameless, capsys):
    from klgap.plan.resolve import build_intervention as build_perturbation

    with pytest.raises(KlgapError, match="without name, geometry"):
        build_perturbation("nameless")
    code = main(["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--dataset", "random",
                 "--interventions", "sae,nameless", "--dry-run"])
    assert code == 2 and "klgap: error: intervention 'nameless': its factory returned a _Nameless" in capsys.readouterr().err


def _sparsify_folder(root, hookpoint="layers.1.mlp", d_in=64, n=128):
    folder = root / hookpoint
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    save_file({"encoder.weight": torch.randn(n, d_in, generator=gen), "encoder.bias": torch.zeros(n),
               "W_dec": torch.randn(n, d_in, generator=gen), "b_dec": torch.zeros(d_in)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": n, "k": 8, "d_in": d_in}))
    return folder


def test_dry_run_checks_a_local_folders_hook_without_reading_its_weights(tmp_path, capsys):
    folder = _sparsify_folder(tmp_path)
    (folder / "sae.safetensors").write_bytes(b"not read by check()")
    argv = ["replicate", "--model", "tiny-gpt2", "--sae", f"sparsify:{folder}", "--dataset", "random", "--dry-run"]
    assert main([*argv, "--site", "mlp_out", "--layer", "1"]) == 0
    assert f"mlp_out L1: SAE sparsify:{folder} (blocks.1.hook_mlp_out): checked" in capsys.readouterr().out
    assert main([*argv, "--site", "mlp_out", "--layer", "0"]) == 2
    assert "was trained on blocks.1.hook_mlp_out (site mlp_out, layer 1) but --site mlp_out --layer 0 was given" in capsys.readouterr().err


def test_a_hub_model_adapter_is_declared_by_its_repo_id():
    """--dry-run lists a model's hub repo only for adapters that declare HubModelAdapter (a str repo_id)."""
    from klgap.plugins.capabilities import hub_repo
    from klgap.plugins.manager import model_adapter
    from klgap.protocols import HubModelAdapter

    class Hub:
        repo_id = "ORG/NAME"

    class BadHub:
        repo_id = 3

    assert isinstance(Hub(), HubModelAdapter) and hub_repo(Hub()) == "ORG/NAME"
    assert hub_repo(model_adapter("tiny-gpt2").adapter) is None  # built from a config: nothing from the hub
    assert hub_repo(model_adapter("EleutherAI/pythia-70m").adapter) == "EleutherAI/pythia-70m"
    with pytest.raises(PluginError, match=r"BadHub.repo_id is 3; it must be a str"):
        hub_repo(BadHub())


@pytest.mark.parametrize("attribute", ["every_position", "frozen_error", "without_skip"])
def test_a_bool_capability_is_false_undeclared_its_value_declared_and_refused_otherwise(attribute):
    from klgap.plugins import capabilities

    ask = getattr(capabilities, attribute)

    class Declares:
        def __init__(self, value):
            setattr(self, attribute, value)

    assert ask(object()) is False  # not declared
    assert ask(Declares(True)) is True and ask(Declares(False)) is False
    with pytest.raises(PluginError, match=rf"perturbation Declares\.{attribute} is 'yes'; it must be a bool"):
        ask(Declares("yes"))
