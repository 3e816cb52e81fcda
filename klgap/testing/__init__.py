"""Tools for plugin authors: a conformance suite and pytest fixtures.

Subclass a suite in your plugin's tests and set its attributes; pytest runs every check on your plugin::

    from klgap.testing import PerturbationConformance

    class TestMyNoise(PerturbationConformance):
        spec = "my_noise:scale=0.5"      # what a user would pass to --interventions

The built-in plugins run the same suites (tests/plugins/test_conformance.py). Fixtures (a tiny model, an SAE
file written for it) come from ``pytest_plugins = ["klgap.testing.fixtures"]`` in your conftest.py;
``use_plugin(NAME, module)`` there lets the tests run from the source tree before the package is installed.
"""

from typing import Any

from klgap.testing.conformance import ModelAdapterConformance, PerturbationConformance, SAELoaderConformance
from klgap.testing.token_sources import TokenSourceConformance


def use_plugin(name: str, module: Any) -> None:
    """Register `module` (its ``@klgap.hookimpl`` functions) as plugin `name`, unless an installed ``klgap`` entry
    point already registered a plugin of that name: a plugin's tests then pass before ``pip install -e .``."""
    from klgap.plugins.manager import get_host

    host = get_host()
    if not host.pm.has_plugin(name):
        host.add_plugin(module, name)


__all__ = ["ModelAdapterConformance", "PerturbationConformance", "SAELoaderConformance", "TokenSourceConformance",
           "use_plugin"]
