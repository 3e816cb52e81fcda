"""Models from the Hugging Face hub (or its local cache) through the real ``from_pretrained`` path.

Loading tries the local HF cache first; only on a cache miss does it go to the hub, and only after a
quick reachability check, so an offline machine gets a one-line :class:`HubUnavailableError` at once
instead of a minute of retries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from klgap.errors import HubUnavailableError, KlgapError
from klgap.plugins.hubcheck import hub_reachable, offline_env
from klgap.protocols import LoadedModel, ModelShape, Placement
from klgap_hf.families import shape_of
from klgap_hf.loaded import check_structure, wrap_loaded

#: klgap name -> hub repo id, for the names registered by this plugin.
HUB_MODELS: dict[str, str] = {
    **{name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")},
    **{
        f"pythia-{size}{dedup}": f"EleutherAI/pythia-{size}{dedup}"
        for size in ("70m", "160m", "410m", "1b")
        for dedup in ("", "-deduped")
    },
}

#: hub repo id -> model names under which sae_lens's pretrained directory (sae_lens 6.54) lists SAEs, best first.
SAE_LENS_MODELS: dict[str, tuple[str, ...]] = {
    "openai-community/gpt2": ("gpt2-small",),
    "gpt2": ("gpt2-small",),
    "EleutherAI/pythia-70m-deduped": ("pythia-70m-deduped",),
    "EleutherAI/pythia-70m": ("pythia-70m", "pythia-70m-deduped"),
    # Gemma (Gemma Scope: gemma-2; Gemma Scope 2: gemma-3, the 4B-27B checkpoints are multimodal)
    "google/gemma-2b": ("gemma-2b",),
    "google/gemma-2b-it": ("gemma-2b-it",),
    "google/gemma-2-2b": ("gemma-2-2b",),
    "google/gemma-2-9b": ("gemma-2-9b",),
    "google/gemma-2-9b-it": ("gemma-2-9b-it", "gemma-2-9b"),
    "google/gemma-2-27b": ("gemma-2-27b",),
    **{f"google/gemma-3-{size}": (f"google/gemma-3-{size}",)
       for size in ("270m", "270m-it", "1b-pt", "1b-it", "4b-pt", "4b-it", "12b-pt", "12b-it", "27b-pt", "27b-it")},
    # Llama (Llama Scope and others), Mistral
    "meta-llama/Llama-3.1-8B": ("meta-llama/Llama-3.1-8B",),
    "meta-llama/Llama-3.1-8B-Instruct": ("meta-llama/Llama-3.1-8B-Instruct",),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("meta-llama/Meta-Llama-3-8B-Instruct",),
    "meta-llama/Llama-3.3-70B-Instruct": ("meta-llama/Llama-3.3-70B-Instruct",),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B",),
    "mistralai/Mistral-7B-v0.1": ("mistral-7b",),
    # Qwen (Qwen Scope and others; the qwen3-* names hold transcoders, which klgap refuses)
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen/Qwen2.5-7B-Instruct",),
    **{f"Qwen/Qwen3-{size}-Base": (f"Qwen/Qwen3-{size}-Base",) for size in ("1.7B", "8B", "30B-A3B")},
    **{f"Qwen/Qwen3-{size}": (f"qwen3-{size.lower()}",) for size in ("0.6B", "1.7B", "4B", "8B", "14B")},
    **{f"Qwen/Qwen3.5-{size}": (f"Qwen/Qwen3.5-{size}",) for size in ("2B-Base", "9B-Base", "27B", "35B-A3B-Base")},
    "openai/gpt-oss-20b": ("openai/gpt-oss-20b",),
}

#: hub repo id -> a note shown with any SAE picked for it.
SAE_NOTES: dict[str, str] = {
    "EleutherAI/pythia-70m": (
        "sae_lens has no SAEs for pythia-70m, so the pythia-70m-deduped release is used; its weights differ "
        "from pythia-70m's (prefer --model pythia-70m-deduped)"
    ),
}

OFFLINE_HINT = "use an offline model such as smollm2-135m or tiny-gpt2, or pre-download it into the HF cache"


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'could not get the files' (huggingface_hub's are OSErrors; httpx's are not)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


@dataclass
class HubAdapter:
    """``name``: the causal LM `repo_id`, loaded with ``AutoModelForCausalLM.from_pretrained``."""

    name: str
    repo_id: str
    sae_lens_models: tuple[str, ...] = ()
    sae_note: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.description or f"{self.repo_id} from the Hugging Face hub (needs the hub or HF cache)"

    def config(self) -> Any:
        """The repo's transformers config, from the HF cache, else the hub (nothing else is fetched)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.repo_id, local_files_only=True)
        except _hub_errors() as cache_miss:
            if offline_env() or not hub_reachable():
                raise self._unavailable() from cache_miss
            try:
                return AutoConfig.from_pretrained(self.repo_id)
            except _hub_errors() as exc:
                raise self._translate(exc) from exc

    def shape(self) -> ModelShape:
        """Layers, longest context and site widths from the config (klgap.ShapedModelAdapter): no weights read."""
        return shape_of(self.config())

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """Load from the HF cache, else the hub; HubUnavailableError when neither has it."""
        return self.load_placed(device, dtype, Placement())

    def load_placed(self, device: torch.device, dtype: torch.dtype, placement: Placement) -> LoadedModel:
        """:class:`klgap.protocols.PlacingModelAdapter`: as :meth:`load`, placed as `placement` says.

        device_map: e.g. ``"auto"``: transformers/accelerate spread the layers over the GPUs (and CPU).
        remote: build the model on the meta device with nnsight's ``LanguageModel`` (config and tokenizer
        only) and run every forward pass on NDIF (``trace(remote=True)``; needs an NDIF API key).
        """
        if placement.remote:
            return self._load_remote(dtype)
        device_map = placement.device_map
        try:
            hf_model, tokenizer, tokenizer_note = self._from_pretrained(dtype, local_files_only=True,
                                                                        device_map=device_map)
        except _hub_errors() as cache_miss:
            if offline_env() or not hub_reachable():
                raise self._unavailable() from cache_miss
            try:
                hf_model, tokenizer, tokenizer_note = self._from_pretrained(dtype, local_files_only=False,
                                                                            device_map=device_map)
            except _hub_errors() as exc:
                raise self._translate(exc) from exc
        info: dict[str, Any] = {"source": f"hf:{self.repo_id}", "hf_repo": self.repo_id}
        if tokenizer_note:
            info["tokenizer_note"] = tokenizer_note
        if device_map is not None:
            device = hf_model.get_input_embeddings().weight.device
            placed = getattr(hf_model, "hf_device_map", None) or {"": str(device)}
            info["device_map"] = {"requested": device_map, "placed": {k: str(v) for k, v in placed.items()}}
        return wrap_loaded(self.name, hf_model, tokenizer, device, dtype, self.sae_lens_models, info,
                           move=device_map is None, sae_note=self.sae_note, tokenizer_note=tokenizer_note or None)

    def _load_remote(self, dtype: torch.dtype) -> LoadedModel:
        """The model as NDIF serves it: meta weights here, forward passes there (results come back to CPU)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.repo_id)
            try:
                from nnsight import TransformersModel
            except ImportError:  # nnsight < 0.8
                from nnsight import LanguageModel

                lm = LanguageModel(self.repo_id, tokenizer=tokenizer, dtype=dtype)
            else:
                lm = TransformersModel(self.repo_id, task="text-generation", tokenizer=tokenizer, dtype=dtype)
        except _hub_errors() as exc:
            raise self._translate(exc) from exc
        info: dict[str, Any] = {"source": f"ndif:{self.repo_id}", "hf_repo": self.repo_id, "remote": True}
        module = getattr(lm, "_module", None) or lm._model
        # the fast paths call modules here, so a remote model gets no layout and no KV cache: full traces only
        return wrap_loaded(self.name, module, tokenizer, torch.device("cpu"), dtype, self.sae_lens_models,
                           info, move=False, remote=True, nnsight=lm, sae_note=self.sae_note)

    def _from_pretrained(self, dtype: torch.dtype, local_files_only: bool,
                         device_map: str | None = None) -> tuple[torch.nn.Module, Any, str]:
        """Config first (a model whose blocks cannot be found fails on the meta device, before any weights are
        fetched), then the tokenizer (faithful to tokenizer.json: klgap_hf.tokenizer.load_tokenizer), the model."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from klgap_hf.tokenizer import load_tokenizer

        config = AutoConfig.from_pretrained(self.repo_id, local_files_only=local_files_only)
        check_structure(config)
        tokenizer, tokenizer_note = load_tokenizer(self.repo_id, local_files_only=local_files_only)
        extra = {"device_map": device_map} if device_map is not None else {}
        hf_model = AutoModelForCausalLM.from_pretrained(
            self.repo_id, config=config, dtype=dtype, local_files_only=local_files_only, **extra
        )
        return hf_model, tokenizer, tokenizer_note

    def _unavailable(self) -> HubUnavailableError:
        return HubUnavailableError(
            f"model {self.name!r} needs the Hugging Face hub ({self.repo_id}), which this machine cannot reach; "
            f"{OFFLINE_HINT}"
        )

    def _translate(self, exc: BaseException) -> KlgapError:
        """A hub error as a one-line KlgapError: no such repo, gated repo, or hub unreachable."""
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        if isinstance(exc, GatedRepoError):
            return KlgapError(f"model {self.name!r}: hub repo {self.repo_id} is gated; accept its licence and log in")
        if isinstance(exc, RepositoryNotFoundError):
            return KlgapError(f"model {self.name!r}: there is no hub repo {self.repo_id!r} (or it is private)")
        return self._unavailable()


def adapter_for_repo(repo_id: str, name: str | None = None, description: str = "") -> HubAdapter:
    """An adapter for any supported causal LM on the hub, e.g. ``adapter_for_repo("EleutherAI/pythia-1b")``.

    `name` defaults to the repo's last path part. sae_lens model names and notes come from
    :data:`SAE_LENS_MODELS` / :data:`SAE_NOTES` when the repo is known there.
    """
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1 or ":" in repo_id:
        raise KlgapError(f"{repo_id!r} is not a hub repo id; expected ORG/NAME, e.g. EleutherAI/pythia-70m")
    repo_id = repo_id.strip()
    return HubAdapter(
        name=name or repo_id.rsplit("/", 1)[-1],
        repo_id=repo_id,
        sae_lens_models=SAE_LENS_MODELS.get(repo_id, ()),
        sae_note=SAE_NOTES.get(repo_id),
        description=description,
    )


REPO_ENV = "KLGAP_HF_REPO"


@dataclass
class AnyRepoAdapter:
    """``hf``: any supported causal LM by hub repo id (``load(..., repo_id=)`` or ``KLGAP_HF_REPO=ORG/NAME``).

    Registry names cannot hold ``ORG/NAME``, so the repo id arrives as an argument (Python) or through
    the environment (command line: ``KLGAP_HF_REPO=EleutherAI/pythia-1b klgap ... --model hf``).
    """

    description: str = (
        f"any hub causal LM by repo id: set {REPO_ENV}=ORG/NAME (an alias of --model ORG/NAME), "
        "or call klgap_hf.adapter_for_repo('ORG/NAME')"
    )

    def _repo(self, repo_id: str | None = None) -> str:
        repo_id = repo_id or os.environ.get(REPO_ENV, "").strip()
        if not repo_id:
            raise KlgapError(
                f"model 'hf' needs a hub repo id: set {REPO_ENV}=ORG/NAME (e.g. EleutherAI/pythia-1b), or pass the "
                "repo id itself (--model EleutherAI/pythia-1b), or pick a named model such as gpt2 or smollm2-135m"
            )
        return repo_id

    def config(self) -> Any:
        """The config of the repo named by KLGAP_HF_REPO."""
        return adapter_for_repo(self._repo()).config()

    def shape(self) -> ModelShape:
        """Layers, longest context and site widths from the config (klgap.ShapedModelAdapter): no weights read."""
        return shape_of(self.config())

    def for_repo(self, repo_id: str) -> HubAdapter:
        """The adapter of one repo (same as :func:`adapter_for_repo`)."""
        return adapter_for_repo(repo_id)

    def load(self, device: torch.device, dtype: torch.dtype, repo_id: str | None = None) -> LoadedModel:
        return adapter_for_repo(self._repo(repo_id)).load(device, dtype)
