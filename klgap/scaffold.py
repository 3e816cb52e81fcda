"""`klgap new-plugin NAME`: write a working plugin package (a perturbation, its conformance test, packaging).

The generated package registers one perturbation, ``NAME``: x' = x − (x̂ − x) = 2x − x̂, the SAE's error
mirrored through x (same L2 error as the SAE, opposite direction). Replace its formula with yours; the test
it ships runs klgap's conformance suite and a tiny-model measurement, so `pytest` tells you when you broke
the contract.
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
description = "A klgap plugin: the ${name} perturbation"
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
''',
    "README.md": '''\
# klgap-${dash}

A [klgap](https://example.invalid/klgap) plugin that registers the perturbation `${name}`:
x' = 2x − x̂, the SAE's reconstruction error mirrored through x (same ε as the SAE, opposite direction).

```bash
pip install -e .            # next to klgap, in the same environment
klgap plugins               # lists ${name}
klgap replicate --model tiny-gpt2 --site resid_pre --layer 1 --sae SAE --interventions sae,epsilon_random,${name}
pip install -e ".[test]" && pytest   # klgap's conformance suite + a tiny-model run
```

Publish: `python -m build && twine upload dist/*` (the `klgap` entry point travels with the wheel).
''',
    "${package}/__init__.py": '''\
"""The ${name} perturbation: x' = 2x − x̂ (the SAE's error, mirrored)."""

from __future__ import annotations

import klgap
import torch


class Mirrored:
    """x' = x + (x − x̂): as far from x as the SAE's reconstruction, in the opposite direction."""

    name = "${name}"
    stochastic = False  # True if __call__ draws from `generator` (then many-samples mode can draw it)
    geometry = {"distance": "eps"}  # what it matches; klgap's conformance suite checks it

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x, x_hat: [n, d] (one row per token) -> x': [n, d] float32 on x's device."""
        return (2 * x.float() - x_hat.float())


def make(**params: str) -> Mirrored:
    """The factory klgap calls with the user's parameters (`--interventions ${name}:key=value`)."""
    if params:
        raise klgap.KlgapError(f"${name} takes no parameters, got {sorted(params)}")
    return Mirrored()


@klgap.hookimpl
def register_perturbations(register):
    register("${name}", make, "x' = 2x − x̂: the SAE's error mirrored through x")
''',
    "tests/conftest.py": '''\
pytest_plugins = ["klgap.testing.fixtures"]  # klgap_tiny_model, klgap_sae_file
''',
    "tests/test_${name}.py": '''\
"""klgap's conformance suite on ${name}, plus one measurement on a tiny model."""

import torch

from klgap.testing import PerturbationConformance


class Test${camel}(PerturbationConformance):
    spec = "${name}"


def test_${name}_in_a_run(klgap_sae_file):
    import klgap

    sae = klgap_sae_file(64, 256, "blocks.1.hook_resid_pre")
    result = klgap.measure("tiny-gpt2", str(sae), tokens=124, context_len=32, batch_size=4, dataset="random",
                           device="cpu", interventions="sae,${name}", progress=False)
    kl = result.report.interventions
    assert kl["${name}"].n_tokens == 124 and kl["${name}"].kl_mean > 0
    assert result.report.plugins["perturbation:${name}"].plugin == "${name}"
''',
}


def create_plugin(name: str, directory: str | Path | None = None) -> Path:
    """Write the package ``klgap-NAME`` into `directory` (default ./klgap-NAME); return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name or ""):
        raise KlgapError(f"plugin name {name!r} is not valid: use lower-case letters, digits and _ (e.g. my_noise)")
    values = {"name": name, "dash": name.replace("_", "-"), "package": f"klgap_{name}",
              "camel": "".join(part.capitalize() for part in name.split("_"))}
    root = Path(directory) if directory is not None else Path(f"klgap-{values['dash']}")
    if root.exists() and any(root.iterdir()):
        raise KlgapError(f"{str(root)!r} already exists and is not empty; pick another --dir")
    for rel, text in FILES.items():
        path = root / Template(rel).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(text).substitute(values))
    return root
