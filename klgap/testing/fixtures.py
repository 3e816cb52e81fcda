"""pytest fixtures for plugin tests: ``pytest_plugins = ["klgap.testing.fixtures"]`` in your conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def klgap_tiny_model():
    """``klgap_tiny_model("tiny-gpt2")`` -> a LoadedModel (CPU, float32), built once per session."""
    from klgap.job.loading import load_model

    return lambda name="tiny-gpt2": load_model(name, torch.device("cpu"), torch.float32)


@pytest.fixture
def klgap_sae_file(tmp_path: Path):
    """``klgap_sae_file(d_in, d_sae, hook_name)`` -> path of a random ReLU SAE in the plain safetensors format."""
    from klgap.sae.file import save_safetensors_sae

    def make(d_in: int = 64, d_sae: int = 256, hook_name: str | None = "blocks.1.hook_resid_pre", seed: int = 0) -> Path:
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_sae, d_in, generator=gen) / d_in**0.5
        return save_safetensors_sae(tmp_path / f"sae_{seed}.safetensors", 2.0 * W_dec.T, W_dec, torch.zeros(d_sae),
                                    torch.zeros(d_in), hook_name=hook_name)

    return make
