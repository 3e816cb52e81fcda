"""The conformance suite catches broken plugins (it is only worth running if it can fail)."""

from __future__ import annotations

import pytest
import torch

import klgap
from klgap.plugins.manager import get_host, reset_host
from klgap.testing import PerturbationConformance, SAELoaderConformance


class _LiesAboutEps:
    """Claims to keep the SAE's L2 error but doubles it; claims not to be random but is."""

    name = "liar"
    stochastic = False
    geometry = {"distance": "eps"}

    def __call__(self, x, x_hat, generator):
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return x + 2 * (x - x_hat).norm(dim=-1, keepdim=True) * noise / noise.norm(dim=-1, keepdim=True)


class _Plugin:
    @klgap.hookimpl
    def register_perturbations(self, register):
        register("liar", _LiesAboutEps, "a broken perturbation for this test")


@pytest.fixture
def with_liar():
    reset_host()
    get_host().add_plugin(_Plugin(), "liar-plugin")
    yield
    reset_host()


class _LiarSuite(PerturbationConformance):
    spec = "liar"


def test_suite_fails_a_lying_perturbation(with_liar):
    suite = _LiarSuite()
    suite.test_shape_dtype_device()  # shape, dtype and device are fine
    with pytest.raises(AssertionError, match="declared not stochastic"):
        suite.test_deterministic_under_a_seed()
    with pytest.raises(AssertionError, match="declared distance 'eps' does not hold"):
        suite.test_declared_geometry()


# ----------------------------------------------------------------------------- declared capabilities


class _WrongCheck:
    """Loads plain safetensors files, but its check() (--dry-run) names another hook than the file's."""

    description = "safetensors files, with a check() that lies about the hook"

    def can_load(self, spec):
        return False

    def load(self, spec, device):
        return get_host().registry("sae_loader").get("safetensors").load(spec, device)

    def check(self, spec):
        from klgap.protocols import SAECheck

        return SAECheck(hook_name="blocks.0.hook_attn_out")


class _UnseededFit:
    """Fits a random projection drawn from torch's global generator: two fits differ."""

    name = "unseeded_fit"
    stochastic = False
    geometry: dict = {}

    def fit(self, acts):
        self.direction = torch.randn(acts.shape[1])

    def __call__(self, x, x_hat, generator):
        return x + 0.01 * self.direction


class _CapabilityPlugin:
    @klgap.hookimpl
    def register_sae_loaders(self, register):
        register("wrong-check", _WrongCheck())

    @klgap.hookimpl
    def register_perturbations(self, register):
        register("unseeded_fit", _UnseededFit, "a fit that is not reproducible")


@pytest.fixture
def with_capabilities():
    reset_host()
    get_host().add_plugin(_CapabilityPlugin(), "capability-plugin")
    yield
    reset_host()


class _WrongCheckSuite(SAELoaderConformance):
    loader = "wrong-check"
    expected_hook = "blocks.1.hook_mlp_out"

    def make_spec(self, tmp_path):
        from klgap.sae.file import save_safetensors_sae

        W_dec = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) / 8
        return str(save_safetensors_sae(tmp_path / "sae.safetensors", 2 * W_dec.T, W_dec, torch.zeros(256),
                                        torch.zeros(64), hook_name=self.expected_hook))


def test_suite_fails_a_check_that_names_the_wrong_hook(with_capabilities, tmp_path):
    from klgap.job.loading import load_sae

    suite = _WrongCheckSuite()
    suite.spec = suite.make_spec(tmp_path)
    sae = load_sae(f"wrong-check:{suite.spec}", torch.device("cpu"))
    suite.test_hook_name_parsed(sae)  # the SAE itself is fine
    with pytest.raises(AssertionError, match="check\\(\\) says hook 'blocks.0.hook_attn_out', the loaded SAE has 'blocks.1.hook_mlp_out'"):
        suite.test_check_names_the_loaded_hook(sae)


class _UnseededFitSuite(PerturbationConformance):
    spec = "unseeded_fit"


def test_suite_fails_a_fit_that_is_not_reproducible(with_capabilities):
    suite = _UnseededFitSuite()
    suite.test_shape_dtype_device()
    with pytest.raises(AssertionError, match="two fits on the same activations gave different x'"):
        suite.test_fit_is_reproducible()
