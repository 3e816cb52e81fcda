"""Tools for plugin authors: a conformance suite and pytest fixtures.

Subclass a suite in your plugin's tests and set its attributes; pytest runs every check on your plugin::

    from klgap.testing import PerturbationConformance

    class TestMyNoise(PerturbationConformance):
        spec = "my_noise:scale=0.5"      # what a user would pass to --interventions

The built-in plugins run the same suites (tests/plugins/test_conformance.py). Fixtures (a tiny model, an SAE
file written for it) come from ``pytest_plugins = ["klgap.testing.fixtures"]`` in your conftest.py.
"""

from klgap.testing.conformance import ModelAdapterConformance, PerturbationConformance, SAELoaderConformance

__all__ = ["ModelAdapterConformance", "PerturbationConformance", "SAELoaderConformance"]
