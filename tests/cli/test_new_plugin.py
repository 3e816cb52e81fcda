"""`klgap new-plugin`: the generated package installs, is listed, passes its own (conformance) tests and its
perturbation appears in a `klgap replicate` report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from klgap.cli.main import main
from tests.helpers import random_sae


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("newplugin")
    assert main(["new-plugin", "mirror_err", "--dir", str(root / "pkg")]) == 0
    written = sorted(str(p.relative_to(root / "pkg")) for p in (root / "pkg").rglob("*") if p.is_file())
    (root / "written.json").write_text(json.dumps(written))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(root / "pkg")], check=True, capture_output=True)
    return root


def _path(*first: Path) -> str:
    """PYTHONPATH for a subprocess: `first`, this checkout, then any PYTHONPATH already set (a worktree's plugins/)."""
    given = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*map(str, first), str(Path(__file__).parents[2]), *([given] if given else [])])


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": _path(site), "HF_HUB_OFFLINE": "1"}


def test_files_written(generated):
    pkg = generated / "pkg"
    names = json.loads((generated / "written.json").read_text())
    assert names == ["README.md", "klgap_mirror_err/__init__.py", "pyproject.toml", "tests/conftest.py",
                     "tests/test_mirror_err.py"]
    assert 'mirror_err = "klgap_mirror_err"' in (pkg / "pyproject.toml").read_text()


def test_listed_by_klgap_plugins(generated, tmp_path):
    done = subprocess.run([sys.executable, "-m", "klgap", "plugins", "--json"], capture_output=True, text=True,
                          env=_env(generated / "site"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    infos = {p["name"]: p for p in json.loads(done.stdout)}
    assert infos["mirror_err"]["package"] == "klgap-mirror-err"
    assert infos["mirror_err"]["registers"] == {"perturbation": ["mirror_err"]}


def test_its_own_tests_pass(generated, tmp_path):
    """The conformance suite and the tiny-model run that ship with the generated package."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(generated / "pkg" / "tests")],
                          capture_output=True, text=True, env=_env(generated / "site"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b7 passed", done.stdout), done.stdout  # 6 conformance checks + the run


def test_its_perturbation_in_a_replicate_report(generated, tmp_path):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_resid_pre")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "klgap", "replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random",
         "--tokens", "124", "--context-len", "32", "--interventions", "sae,epsilon_random,mirror_err", "--out", str(out),
         "--quiet"], capture_output=True, text=True, env=_env(generated / "site"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interventions"]["mirror_err"]["kl_mean"] > 0
    assert report["plugins"]["perturbation:mirror_err"] == {"plugin": "mirror_err", "version": "0.1.0"}
    assert "mirror_err" in report["comparisons"]


@pytest.mark.parametrize("name,message", [("My-Plugin", "is not valid"), ("9lives", "is not valid")])
def test_bad_names(tmp_path, capsys, name, message):
    assert main(["new-plugin", name, "--dir", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["new-plugin", "ok_name", "--dir", str(tmp_path / "x")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


KINDS = {"perturbation": "register_perturbations", "sae_loader": "register_sae_loaders",
         "model": "register_model_adapters", "token_source": "register_token_sources"}


def test_every_kind_scaffolds_a_plugin_whose_own_tests_pass_uninstalled(tmp_path, capsys):
    """Each --kind, written to tmp and imported from its folder (PYTHONPATH, no pip install): its conformance suite
    and its tiny-model run pass, the plugin registered by tests/conftest.py (klgap.testing.use_plugin)."""
    roots = []
    for kind, hook in KINDS.items():
        root = tmp_path / kind
        assert main(["new-plugin", f"my_{kind}", "--kind", kind, "--dir", str(root)]) == 0
        assert f"@klgap.hookimpl\ndef {hook}(register):" in (root / f"klgap_my_{kind}" / "__init__.py").read_text()
        assert f"[test]' && klgap plugins && pytest {root / 'tests'}   (pytest runs before installing too)" in \
            capsys.readouterr().out
        assert f"my_{kind} = \"klgap_my_{kind}\"" in (root / "pyproject.toml").read_text()
        roots.append(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _path(*roots)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *(str(r / "tests") for r in roots)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # the optional capabilities a scaffold does not declare are skipped: a perturbation's fit and baseline role, an
    # SAE loader's default_sae, a token source's splits
    assert re.search(r"\b32 passed, 4 skipped\b", done.stdout), done.stdout[-2000:]
    with pytest.raises(SystemExit) as exited:
        main(["new-plugin", "x", "--kind", "tokenizer", "--dir", str(tmp_path / "bad")])
    assert exited.value.code == 2 and "invalid choice: 'tokenizer'" in capsys.readouterr().err


def test_protocol_types_come_from_klgap_itself():
    import klgap
    import klgap.protocols as protocols

    for name in ("LoadedSAE", "LoadedModel", "SiteSpec", "SAECheck", "Perturbation", "TokenSource", "ModelAdapter",
                 "SAELoader", "BlockLayout", "ModelSAENames"):
        assert getattr(klgap, name) is getattr(protocols, name) and name in dir(klgap)
