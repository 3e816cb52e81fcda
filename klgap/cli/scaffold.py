"""`klgap new-plugin NAME [--kind KIND]`: write a working plugin package (the plugin, its conformance test,
packaging).

The kinds (klgap/cli/scaffold_kinds.py): a perturbation (x' = 2x − x̂, the SAE's error mirrored through x), an SAE loader
(a torch file format), a model adapter (a small random GPT-2 from a config) and a token source (arithmetic
sequences of ids). Replace the template with yours; the test it ships runs klgap's conformance suite for its kind
and a tiny-model measurement, so `pytest` tells you when you broke the contract.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from klgap.errors import KlgapError

FILES: dict[str, str] = {
    "pyproject.toml": '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "klgap-${dash}"
version = "0.1.0"
description = "A klgap plugin: ${summary}"
requires-python = ">=3.11"
dependencies = ["klgap"]

[project.optional-dependencies]
test = ["pytest"]

# klgap finds plugins through this entry-point group: the key names the plugin, the value is the module
# holding its @klgap.hookimpl functions.
[project.entry-points.klgap]
${name} = "${package}"

[tool.setuptools]
packages = ["${package}"]

[tool.pytest.ini_options]
pythonpath = ["."]  # the tests import ${package} from this folder, installed or not
''',
    "README.md": '''\
# klgap-${dash}

A klgap plugin (${kind}, hook `${hook}`): ${summary}. klgap's CONTRIBUTING.md, "Writing a plugin", says what
each hook and conformance suite asks of it.

```bash
pip install -e ".[test]"    # next to klgap, in the same environment (with pytest for its tests)
klgap plugins               # lists ${name}
pytest                      # klgap's conformance suite for a ${kind} + a tiny-model run
```

`pytest` also runs before `pip install` (tests/conftest.py registers the plugin from this folder). Publish:
`python -m build && twine upload dist/*` (the `klgap` entry point travels with the wheel).
''',
    "tests/conftest.py": '''\
import ${package}
from klgap.testing import use_plugin
from klgap.testing.fixtures import klgap_sae_file, klgap_tiny_model  # noqa: F401  (pytest fixtures)

use_plugin("${name}", ${package})  # registered from this folder unless the installed entry point did it
''',
}


def create_plugin(name: str, directory: str | Path | None = None, kind: str = "perturbation") -> Path:
    """Write the package ``klgap-NAME`` (a plugin of `kind`: :data:`klgap.cli.scaffold_kinds.KINDS`) into
    `directory` (default ./klgap-NAME); return its path."""
    from klgap.errors import unknown
    from klgap.cli.scaffold_kinds import KINDS

    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name or ""):
        raise KlgapError(f"plugin name {name!r} is not valid: use lower-case letters, digits and _ (e.g. my_noise)")
    if kind not in KINDS:
        raise unknown("plugin kind", kind, KINDS)
    values = {"name": name, "dash": name.replace("_", "-"), "package": f"klgap_{name}",
              "camel": "".join(part.capitalize() for part in name.split("_")), "kind": kind, "hook": KINDS[kind].hook}
    values["summary"] = Template(KINDS[kind].summary).substitute(values)
    root = Path(directory) if directory is not None else Path(f"klgap-{values['dash']}")
    if root.exists() and any(root.iterdir()):
        raise KlgapError(f"{str(root)!r} already exists and is not empty; pick another --dir")
    files = {**FILES, "${package}/__init__.py": KINDS[kind].module, "tests/test_${name}.py": KINDS[kind].test}
    for rel, text in files.items():
        path = root / Template(rel).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values))
    return root
