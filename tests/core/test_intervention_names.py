"""An intervention's recorded name carries its parameters (`my_noise` and `my_noise:scale=3` are two interventions);
names of unparameterised interventions, and of those that name themselves, are unchanged."""

from __future__ import annotations

import json

import pytest
import torch

import klgap
from klgap.cli.main import main
from klgap.plugins.manager import get_host, reset_host
from klgap.plan.resolve import build_interventions, recorded_name
from tests.helpers import random_sae


class _Scaled:
    """x' = x + scale·(x̂ − x): scale 1 is the SAE itself; its `name` does not say the scale."""

    name = "my_noise"
    stochastic = False
    geometry: dict = {}

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (x + self.scale * (x_hat - x)).float()


class _Plugin:
    @klgap.hookimpl
    def register_perturbations(self, register):
        register("my_noise", lambda scale="1": _Scaled(float(scale)), "x + scale·(x̂ − x)")


@pytest.fixture
def my_noise():
    reset_host()
    get_host().add_plugin(_Plugin(), "my-noise-plugin")
    yield
    reset_host()


def test_recorded_name_rule():
    assert recorded_name("my_noise", {}, "my_noise") == "my_noise"
    assert recorded_name("my_noise", {"scale": "3"}, "my_noise") == "my_noise(scale=3)"
    assert recorded_name("my_noise", {"b": "2", "a": "1"}, "my_noise") == "my_noise(a=1,b=2)"  # keys sorted
    own = "cosine_matched(cos=0.8,norm_frac=0.9)"  # a perturbation that names itself keeps its name
    assert recorded_name("cosine_matched", {"cos": "0.8", "norm_frac": "0.9"}, own) == own


def test_builtin_names_are_unchanged():
    names = [i.name for i in build_interventions(
        ["sae", "sae_norm_corrected", "epsilon_random", "theta_random", "theta_random:norm=x", "cosine_matched:cos=0.8"])]
    assert names == ["sae", "sae_norm_corrected", "epsilon_random", "theta_random", "theta_random(norm=x)",
                     "cosine_matched(cos=0.8,norm_frac=1)"]


def test_a_parameterised_perturbation_is_its_own_intervention_in_a_run(my_noise, tmp_path, capsys):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_resid_pre")
    out = tmp_path / "run"
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random", "--tokens", "124",
                 "--context-len", "32", "--batch-size", "4", "--interventions",
                 "sae,epsilon_random,my_noise,my_noise:scale=3", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    kl = {name: stats["kl_mean"] for name, stats in report["interventions"].items()}
    assert set(kl) == {"sae", "epsilon_random", "my_noise", "my_noise(scale=3)"}
    assert kl["my_noise"] == pytest.approx(kl["sae"], rel=1e-4)  # scale 1: x + (x̂ − x) = x̂
    assert kl["my_noise(scale=3)"] > kl["my_noise"]  # three times the SAE's error moves the output more
    assert [i["spec"] for i in json.loads((out / "run.json").read_text())["interventions"]][2:] == [
        "my_noise", "my_noise:scale=3"]
    capsys.readouterr()
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random",
                 "--interventions", "sae,my_noise:scale=3,my_noise:scale=3", "--dry-run"]) == 2
    assert ("intervention 'my_noise(scale=3)' is listed twice in --interventions (my_noise:scale=3 and "
            "my_noise:scale=3 name the same perturbation)") in capsys.readouterr().err
