"""What `klgap new-plugin NAME --kind KIND` writes besides the packaging: the plugin module and its test, per kind.

Each test runs klgap's conformance suite for its kind (klgap.testing) and one measurement on a tiny model. The
templates are :class:`string.Template` text: ``${name}``, ``${package}``, ``${camel}``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One kind of plugin: the hook it implements, a one-line summary, its module and its test."""

    hook: str
    summary: str
    module: str
    test: str


PERTURBATION = Kind("register_perturbations", "the ${name} perturbation: x' = 2x − x̂ (the SAE's error, mirrored)", '''\
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
''', '''\
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
''')

SAE_LOADER = Kind("register_sae_loaders", "the ${name} SAE format: one torch file *.${name}.pt (W_enc, W_dec, b_enc, "
                  "b_dec, hook_name)", '''\
"""The ${name} SAE format: one torch file ``*.${name}.pt`` holding W_enc [d_in d_sae], W_dec [d_sae d_in], b_enc,
b_dec and hook_name. Replace ``_read`` and ``ReluSAE`` with your format and architecture."""

from __future__ import annotations

from pathlib import Path

import klgap
import torch
from klgap import LoadedSAE, SAECheck

SUFFIX = ".${name}.pt"
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


class ReluSAE(torch.nn.Module):
    """features = relu((x − b_dec) W_enc + b_enc); reconstruction = features W_dec + b_dec."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> None:
        super().__init__()
        for key, value in zip(TENSORS, (W_enc, W_dec, b_enc, b_dec)):
            self.register_parameter(key, torch.nn.Parameter(value.float(), requires_grad=False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, d_in] -> features [n, d_sae]."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, d_sae] -> reconstruction [n, d_in]."""
        return features @ self.W_dec + self.b_dec


def save(path: str | Path, W_enc, W_dec, b_enc, b_dec, hook_name: str | None = None) -> Path:
    """Write an SAE in this format (what your training code would do)."""
    path = Path(path)
    torch.save({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "hook_name": hook_name}, path)
    return path


def _read(spec: str) -> dict:
    """The file's contents, memory-mapped (``check`` reads the hook name without reading the weights)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise klgap.KlgapError(f"${name} SAE file {spec!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file, or not a torch file at all
        raise klgap.KlgapError(f"${name} SAE file {spec!r} could not be read: {type(exc).__name__}: {exc}") from exc
    missing = [key for key in TENSORS if key not in data]
    if missing:
        raise klgap.KlgapError(f"${name} SAE file {spec!r} lacks {', '.join(missing)}; it holds {', '.join(TENSORS)}")
    return data


class Loader:
    """``--sae ${name}:PATH``, or a bare PATH ending in ``${name}.pt``."""

    description = "a *.${name}.pt file: W_enc, W_dec, b_enc, b_dec and hook_name"

    def can_load(self, spec: str) -> bool:
        return spec.endswith(SUFFIX) and Path(spec).expanduser().is_file()

    def check(self, spec: str) -> SAECheck:
        """What --dry-run shows: the hook name, without loading the weights."""
        return SAECheck(hook_name=_read(spec)["hook_name"], detail="${name} file")

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        data = _read(spec)
        module = ReluSAE(*(data[key] for key in TENSORS)).to(device)
        d_in, d_sae = data["W_enc"].shape
        return LoadedSAE(module, int(d_in), int(d_sae), data["hook_name"], str(spec))


@klgap.hookimpl
def register_sae_loaders(register):
    register("${name}", Loader(), Loader.description)
''', '''\
"""klgap's conformance suite on the ${name} SAE loader, plus one measurement on a tiny model."""

import torch

from klgap.testing import SAELoaderConformance
from ${package} import save


def write(path, d_in=64, d_sae=256, hook_name="blocks.1.hook_resid_pre"):
    gen = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=gen) / d_in**0.5
    return save(path, 2.0 * W_dec.T, W_dec, torch.zeros(d_sae), torch.zeros(d_in), hook_name)


class Test${camel}(SAELoaderConformance):
    loader = "${name}"
    model = "tiny-gpt2"  # its resid_pre is 64 wide
    expected_hook = "blocks.1.hook_resid_pre"

    def make_spec(self, tmp_path):
        return str(write(tmp_path / "sae.${name}.pt"))


def test_${name}_sae_in_a_run(tmp_path):
    import klgap

    sae = write(tmp_path / "sae.${name}.pt")
    result = klgap.measure("tiny-gpt2", str(sae), tokens=124, context_len=32, batch_size=4, dataset="random",
                           device="cpu", interventions="sae,epsilon_random", progress=False)
    assert result.report.interventions["sae"].kl_mean > 0 and result.report.layer == 1
    assert result.report.plugins["sae_loader:${name}"].plugin == "${name}"
''')

MODEL = Kind("register_model_adapters", "the ${name} model: a small random GPT-2 built from a config (replace it "
             "with yours)", '''\
"""The ${name} model: a 2-layer GPT-2 with random weights built from a config (no download). Replace ``build`` with
your model's ``from_pretrained``; klgap finds its sites (klgap_hf's site maps, or the generic one)."""

from __future__ import annotations

import klgap
import torch
from klgap import LoadedModel

CONTEXT = 128


def build() -> torch.nn.Module:
    """The transformers causal LM (float32, fixed seed: the same weights every load)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=CONTEXT, vocab_size=257, bos_token_id=256,
                        eos_token_id=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


class Adapter:
    """``--model ${name}``."""

    description = "${name}: a 2-layer random GPT-2 (a template: replace it with your model)"

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        from klgap_hf.loaded import wrap_loaded
        from klgap_hf.tokenizer import byte_tokenizer

        return wrap_loaded("${name}", build(), byte_tokenizer(CONTEXT), device, dtype,
                           info={"source": "random init (seed 0)"})


@klgap.hookimpl
def register_model_adapters(register):
    register("${name}", Adapter(), Adapter.description)
''', '''\
"""klgap's conformance suite on the ${name} model adapter, plus one measurement with an SAE on it."""

from klgap.testing import ModelAdapterConformance


class Test${camel}(ModelAdapterConformance):
    model = "${name}"


def test_${name}_in_a_run(klgap_sae_file):
    import klgap

    sae = klgap_sae_file(64, 256, "blocks.1.hook_resid_pre")
    result = klgap.measure("${name}", str(sae), tokens=124, context_len=32, batch_size=4, dataset="random",
                           device="cpu", interventions="sae,epsilon_random", progress=False)
    assert result.report.model == "${name}" and result.report.interventions["sae"].kl_mean > 0
''')

TOKEN_SOURCE = Kind("register_token_sources", "the ${name} token source: arithmetic sequences of token ids (replace "
                    "them with your data)", '''\
"""The ${name} token source: each context an arithmetic sequence of token ids (start and step drawn from the
seed). Replace ``contexts`` with your data: read text, tokenize with ``model.tokenizer``, pack into contexts."""

from __future__ import annotations

import klgap
import torch
from klgap import LoadedModel


class Source:
    """``--dataset ${name}``."""

    description = "${name}: arithmetic sequences of token ids (a template: replace with your data)"

    def contexts(self, model: LoadedModel, n_contexts: int, context_len: int, seed: int, prepend_bos: bool,
                 arg: str | None) -> torch.Tensor:
        """[n_contexts, context_len] int64 ids; BOS in column 0 when `prepend_bos`."""
        if arg:
            raise klgap.KlgapError(f"token source '${name}' takes no argument, got {arg!r}")
        if not 2 <= context_len <= model.max_context:
            raise klgap.KlgapError(f"context_len {context_len} is outside 2..{model.max_context} for {model.name}")
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, model.vocab_size, (n_contexts, 1), generator=gen)
        step = torch.randint(1, 8, (n_contexts, 1), generator=gen)
        ids = (start + step * torch.arange(context_len)) % model.vocab_size
        if model.bos_token_id is not None:
            ids[ids == model.bos_token_id] = (model.bos_token_id + 1) % model.vocab_size  # BOS only where asked
            if prepend_bos:
                ids[:, 0] = model.bos_token_id
        return ids.long()


@klgap.hookimpl
def register_token_sources(register):
    register("${name}", Source(), Source.description)
''', '''\
"""klgap's conformance suite on the ${name} token source, plus one measurement on its contexts."""

from klgap.testing import TokenSourceConformance


class Test${camel}(TokenSourceConformance):
    source = "${name}"


def test_${name}_in_a_run(klgap_sae_file):
    import klgap

    sae = klgap_sae_file(64, 256, "blocks.1.hook_resid_pre")
    result = klgap.measure("tiny-gpt2", str(sae), tokens=124, context_len=32, batch_size=4, dataset="${name}",
                           device="cpu", interventions="sae,epsilon_random", progress=False)
    assert result.report.n_tokens == 124 and result.report.interventions["sae"].kl_mean > 0
''')

KINDS: dict[str, Kind] = {"perturbation": PERTURBATION, "sae_loader": SAE_LOADER, "model": MODEL,
                          "token_source": TOKEN_SOURCE}

__all__ = ["KINDS", "Kind"]
