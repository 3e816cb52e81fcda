"""A third-party plugin in a temporary package, pip-installed in the test, found through the entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_SOURCE = '''
import torch
import klgap


class HalfWay:
    """x' = (x + x_hat) / 2: halfway between the activation and its reconstruction."""

    name = "halfway"
    stochastic = False
    geometry = {}

    def __call__(self, x, x_hat, generator):
        return (x + x_hat) / 2


@klgap.hookimpl
def register_perturbations(register):
    register("halfway", HalfWay, "x' = (x + x_hat) / 2 (a third-party test plugin)")
'''

BROKEN_SOURCE = "raise ImportError('this plugin is broken on purpose')\n"


def _make_package(root: Path, name: str, source: str) -> Path:
    pkg = root / name
    (pkg / name).mkdir(parents=True)
    (pkg / name / "__init__.py").write_text(source)
    (pkg / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name.replace('_', '-')}"
            version = "0.3.1"

            [project.entry-points.klgap]
            {name} = "{name}"
            """
        )
    )
    return pkg


def _pip_install(pkg: Path, target: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(pkg)],
        check=True,
        capture_output=True,
    )


def _klgap(args: list[str], site_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    # the temp site first; a PYTHONPATH already set (a worktree's klgap/ and plugins/) stays after it
    path = os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "klgap", *args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("thirdparty")
    site_dir = root / "site"
    _pip_install(_make_package(root / "src", "klgap_halfway", PLUGIN_SOURCE), site_dir)
    return site_dir


def test_listed_by_klgap_plugins(installed, tmp_path):
    done = _klgap(["plugins", "--json"], installed, tmp_path)
    assert done.returncode == 0, done.stderr
    infos = {p["name"]: p for p in json.loads(done.stdout)}
    assert infos["klgap_halfway"]["package"] == "klgap-halfway"
    assert infos["klgap_halfway"]["version"] == "0.3.1"
    assert infos["klgap_halfway"]["registers"] == {"perturbation": ["halfway"]}


def test_its_perturbation_runs_in_replicate(installed, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from tests.helpers import shrink_sae

    sae = shrink_sae(tmp_path / "sae.safetensors", 64, 0.5, "blocks.1.hook_mlp_out")
    out = tmp_path / "run"
    done = _klgap(
        ["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random", "--tokens", "128",
         "--context-len", "32", "--interventions", "sae,halfway,sae_norm_corrected", "--out", str(out), "--quiet"],
        installed, tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    kl = report["interventions"]
    # x̂ = 0.5x, so halfway is 0.75x: between the SAE (0.5x) and the clean run
    assert 0 < kl["halfway"]["kl_mean"] < kl["sae"]["kl_mean"]
    assert kl["sae_norm_corrected"]["kl_mean"] < 1e-6
    assert report["plugins"]["perturbation:halfway"] == {"plugin": "klgap_halfway", "version": "0.3.1"}


def test_broken_plugin_listed_by_klgap_plugins_and_named_by_every_other_command(tmp_path):
    site_dir = tmp_path / "site"
    _pip_install(_make_package(tmp_path / "src", "klgap_broken", BROKEN_SOURCE), site_dir)
    listed = _klgap(["plugins"], site_dir, tmp_path)  # still runs: the broken one listed with its error
    assert listed.returncode == 0, listed.stderr
    assert "klgap_broken  (klgap-broken 0.3.1)\n  BROKEN: plugin 'klgap_broken' (package klgap-broken" in listed.stdout
    assert "ImportError: this plugin is broken on purpose" in listed.stdout
    assert "epsilon_random" in listed.stdout  # the working plugins are listed as before
    as_json = json.loads(_klgap(["plugins", "--json"], site_dir, tmp_path).stdout)
    assert "broken on purpose" in next(i["error"] for i in as_json if i["name"] == "klgap_broken")
    for argv in (["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0"], ["validate", "x"]):
        done = _klgap(argv, site_dir, tmp_path)
        assert done.returncode == 2
        assert "plugin 'klgap_broken' (package klgap-broken" in done.stderr
        assert "this plugin is broken on purpose" in done.stderr and "KLGAP_DISABLE_PLUGINS=klgap_broken" in done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


RAISES_IN_REGISTER = '''
import klgap


@klgap.hookimpl
def register_perturbations(register):
    raise RuntimeError("this plugin fails to register on purpose")
'''
QUICKSTART_REPORT = Path(__file__).parents[2] / "replications" / "smollm2-135m-quickstart" / "results" / "report.json"


@pytest.mark.parametrize("name", ["aaa_broken", "zzz_broken"])  # sorts before / after every built-in entry point
@pytest.mark.parametrize("source,why", [(BROKEN_SOURCE, "ImportError: this plugin is broken on purpose"),
                                        (RAISES_IN_REGISTER, "raised in register_perturbations: RuntimeError")],
                         ids=["fails-at-import", "raises-in-register"])
def test_a_real_broken_entry_point_sorting_first_or_last_breaks_no_command_but_names_itself(tmp_path, name, source, why):
    site_dir = tmp_path / "site"
    _pip_install(_make_package(tmp_path / "src", name, source), site_dir)
    listed = _klgap(["plugins"], site_dir, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"{name}  ({name.replace('_', '-')} 0.3.1)\n  BROKEN: " in listed.stdout and why in listed.stdout
    assert "epsilon_random" in listed.stdout and "tiny-gpt2" in listed.stdout  # the built-ins still listed
    for argv in (["--help"], ["replicate", "--help"]):
        helped = _klgap(argv, site_dir, tmp_path)
        assert helped.returncode == 0 and "usage: klgap" in helped.stdout, helped.stderr
    refused = _klgap(["validate", str(QUICKSTART_REPORT)], site_dir, tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"klgap: error: plugin {name!r}") and why in line
    assert line.endswith(f"Set KLGAP_DISABLE_PLUGINS={name} to skip it.")
    skipped = subprocess.run([sys.executable, "-m", "klgap", "validate", str(QUICKSTART_REPORT)], capture_output=True,
                             text=True, cwd=tmp_path, env={**os.environ, "KLGAP_DISABLE_PLUGINS": name, "PYTHONPATH":
                                                           os.pathsep.join([str(site_dir), os.environ.get("PYTHONPATH", "")])})
    assert skipped.returncode == 0 and "valid klgap report" in skipped.stdout, skipped.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "src"]  # no command wrote anything
