"""klgap: is an SAE's reconstruction worse for the model than a random vector with the same error?

The public surface is small: the plugin protocols (:mod:`klgap.protocols`), the hook specs
(:mod:`klgap.hookspecs`), the plugin manager (:func:`klgap.plugins.get_plugin_manager`), the
measurement engine (:mod:`klgap.engine`) and the command line (:mod:`klgap.cli`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("klgap")
except PackageNotFoundError:  # running from an unbuilt tree
    __version__ = "0.0.0+local"

from klgap.errors import KlgapError  # noqa: E402  (plugins raise `klgap.KlgapError` for bad user input)
from klgap.hookspecs import hookimpl  # noqa: E402  (plugins write `@klgap.hookimpl`)

__all__ = ["KlgapError", "__version__", "hookimpl"]
