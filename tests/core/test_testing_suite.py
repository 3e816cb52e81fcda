"""The conformance suite catches broken plugins (it is only worth running if it can fail)."""

from __future__ import annotations

import pytest
import torch

import klgap
from klgap.plugins import get_host, reset_host
from klgap.testing import PerturbationConformance


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
