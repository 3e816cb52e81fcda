"""Shared fixtures: tiny models built once per session, a CPU device, a seed."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

TINY_MODELS = ("tiny-gpt2", "tiny-pythia", "tiny-llama")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for tests (cpu, cuda)")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(name)


_MODEL_CACHE: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def load_model(device):
    """``load_model("tiny-gpt2")`` -> LoadedModel, built once per session."""
    from klgap.plugins.manager import registry

    def _load(name: str):
        key = (name, str(device))
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = registry("model").get(name).load(device, torch.float32)
        return _MODEL_CACHE[key]

    return _load


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request, load_model):
    """Each tiny model in turn."""
    return load_model(request.param)
