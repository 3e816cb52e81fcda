"""Disjoint tokens by default (issue 30 item 1): train-sae reads a source's train split, a run its eval split when
--dataset names none; training.json records the tokens; an overlap with the SAE's training tokens is said."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from klgap.errors import KlgapError
from klgap.plugins.capabilities import token_split
from klgap.plugins.manager import registry
from klgap.sae.tokens import TrainingTokens

CTX = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A default train-sae on tiny-gpt2 (no --dataset): its folder."""
    from klgap.cli.main import main

    out = tmp_path_factory.mktemp("held") / "sae"
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--tokens", "3000",
                 "--context-len", str(CTX), "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return out


def replicate(sae, out, *extra):
    from klgap.cli.main import main

    return main(["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--tokens", "512", "--context-len", str(CTX),
                 "--interventions", "sae,epsilon_random", "--out", str(out), "--quiet", "--device", "cpu", *extra])


def training_contexts(model, training: dict) -> torch.Tensor:
    """The contexts train-sae read, drawn again from what its training.json records."""
    tokens = TrainingTokens.of(training)
    name, _, arg = tokens.dataset.partition(":")
    return registry("token_source").get(name).contexts(model, tokens.n_contexts, tokens.context_len, tokens.seed,
                                                       tokens.prepend_bos, arg or None)


def measured_contexts(run) -> torch.Tensor:
    """The token ids a run measured, ``[n_contexts ctx - 1]`` (position 0, BOS, is not measured), from tokens.parquet."""
    rows = pd.read_parquet(run / "tokens.parquet", columns=["context", "position", "token_id", "intervention"])
    rows = rows[rows.intervention == "sae"].sort_values(["context", "position"])
    return torch.tensor(rows.token_id.to_numpy()).reshape(rows.context.nunique(), -1)


def windows(ids: torch.Tensor) -> set[tuple[int, ...]]:
    """Each context's token window (BOS left out), as a tuple of ids."""
    return {tuple(row.tolist()) for row in ids}


def occurs(window: torch.Tensor, stream: torch.Tensor) -> bool:
    """Whether `window` [w] appears anywhere in `stream` [n], at any offset."""
    return bool((stream.unfold(0, len(window), 1) == window).all(1).any())


def train_stream(model) -> torch.Tensor:
    """The sample's train split as one token stream (what sample:train packs its contexts from)."""
    from klgap_tokens.checks import text_tokenizer
    from klgap_tokens.loading import read_documents
    from klgap_tokens.packing import tokenize_documents
    from klgap_tokens.sources import sample_path
    from klgap_tokens.splits import SAMPLE_SPLITS

    stream = tokenize_documents(text_tokenizer(model), read_documents(sample_path()))
    return stream[: int(SAMPLE_SPLITS["train"][1] * len(stream))]


def test_default_train_sae_then_default_replicate_measure_disjoint_token_windows(trained, tmp_path, capsys, load_model):
    training = json.loads((trained / "training.json").read_text())
    assert {k: training[k] for k in ("dataset", "token_source", "split", "seed", "context_len", "tokens",
                                     "n_contexts")} == {"dataset": "sample:train", "token_source": "sample",
                                                        "split": "train", "seed": 0, "context_len": CTX,
                                                        "tokens": 3000, "n_contexts": 97}
    capsys.readouterr()
    assert replicate(trained, tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "overlap" not in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["dataset"] == report["config"]["dataset"] == "sample:eval"
    assert report["held_out"] == {"dataset": "sample:eval", "split": "eval", "chosen": True,
                                  "trained_on": "sample:train", "status": "disjoint", "why": None}
    assert not any("overlap" in note for note in report["notes"])
    model = load_model("tiny-gpt2")
    train_ids, measured = training_contexts(model, training), measured_contexts(tmp_path / "run")
    assert train_ids.shape == (97, CTX) and measured.shape == (16, CTX - 1)
    # what the report records reproduces what was measured: the eval split's contexts
    eval_ids = registry("token_source").get("sample").contexts(model, 16, CTX, 0, True, "eval")
    assert torch.equal(measured, eval_ids[:, 1:])
    assert windows(train_ids[:, 1:]).isdisjoint(windows(measured))
    # nor does any measured window appear anywhere in the text train-sae packs from (the training windows all do)
    stream = train_stream(model)
    assert all(occurs(row, stream) for row in train_ids[:8, 1:])
    assert not any(occurs(row, stream) for row in measured)
    page = (tmp_path / "run" / "report.md").read_text()
    assert "dataset: sample:eval (the eval split: --dataset named none); apart from the SAE's training tokens " \
           "(sample:train)" in page


def test_a_forced_overlap_warns_in_the_report_and_on_stderr(trained, tmp_path, capsys, load_model):
    capsys.readouterr()
    assert replicate(trained, tmp_path / "run", "--dataset", "sample:train") == 0
    err = capsys.readouterr().err
    assert ("klgap: warning: the measured tokens (sample:train) overlap the SAE's training tokens (sample:train, per "
            "its training.json)") in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["held_out"]["status"] == "overlap" and report["held_out"]["chosen"] is False
    assert report["notes"] == [report["held_out"]["why"]]
    opening = (tmp_path / "run" / "report.md").read_text().split("\n\n")[1]  # the block after the title
    assert opening == f"Warning: {report['held_out']['why']}"
    # and the tokens do overlap: the run's contexts are the first of those the SAE was trained on (same seed)
    training = json.loads((trained / "training.json").read_text())
    train_ids, measured = training_contexts(load_model("tiny-gpt2"), training), measured_contexts(tmp_path / "run")
    assert torch.equal(measured, train_ids[:16, 1:])
    assert windows(measured) <= windows(train_ids[:, 1:])


def test_a_recipe_without_a_dataset_trains_on_the_train_split_of_the_measured_source(tmp_path, capsys):
    """A replication file measuring sample:eval whose [train_sae] names no dataset: its SAE reads sample:train."""
    from klgap.cli.main import main

    sae = tmp_path / "sae"
    (tmp_path / "run.toml").write_text(f'model = "tiny-gpt2"\nsite = "mlp_out"\nlayer = 0\nsae = "{sae}"\n'
                                       f'dataset = "sample:eval"\ntokens = 256\ncontext_len = {CTX}\n'
                                       'interventions = ["sae", "epsilon_random"]\ndevice = "cpu"\n'
                                       '[train_sae]\ntokens = 2000\nsteps = 2\n')
    assert main(["replicate", "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((sae / "training.json").read_text())["dataset"] == "sample:train"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["held_out"]["status"] == "disjoint"


def test_the_api_measures_the_eval_split_when_no_split_is_named():
    import klgap

    plan = klgap.measure("tiny-gpt2", site="mlp_out", layer=0, sae=None, tokens=256, dry_run=True, device="cpu")
    assert plan.config.dataset == "sample:eval" and plan.plans[0].tokens.split == "eval"
    plan = klgap.measure("tiny-gpt2", None, site="mlp_out", layer=0, tokens=256, dataset="random", dry_run=True,
                         device="cpu")
    assert plan.config.dataset == "random" and plan.plans[0].tokens.split is None


def corpus(root):
    """A folder laid out as `klgap build-corpus` writes it."""
    for split in ("train", "eval"):
        (root / split).mkdir(parents=True)
        (root / split / "corpus.jsonl").write_text(json.dumps({"text": f"{split} text"}) + "\n")
    (root / "corpus.json").write_text(json.dumps({"splits": {"train": {}, "eval": {}}}))
    return root


def test_each_built_in_source_declares_its_splits(tmp_path):
    sources = registry("token_source")
    sample, text, hf = sources.get("sample"), sources.get("text"), sources.get("hf")
    assert [token_split(sample, None, role) for role in ("train", "measure")] == [
        klgap_split("train", "train", None, True), klgap_split("eval", "eval", None, True)]
    assert token_split(sample, "train", "measure") == klgap_split("train", "train", None, False)
    with pytest.raises(KlgapError, match="takes no argument or one of train, eval, all, got 'dev'"):
        token_split(sample, "dev", "measure")
    root = corpus(tmp_path / "corpus")
    whole = str(root.resolve())
    assert token_split(text, str(root), "train") == klgap_split(f"{root}/train", "train", whole, True)
    assert token_split(text, f"{root}/", "measure") == klgap_split(f"{root}/eval", "eval", whole, True)
    assert token_split(text, f"{root}/eval", "train") == klgap_split(f"{root}/eval", "eval", whole, False)
    plain = tmp_path / "plain.txt"
    plain.write_text("some text")
    assert token_split(text, str(plain), "measure") == klgap_split(str(plain), None, str(plain.resolve()), False)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text(json.dumps({"text": split}) + "\n")
    assert token_split(hf, str(data), "measure") == klgap_split(f"{data}:validation", "validation", str(data), True)
    assert token_split(hf, str(data), "train") == klgap_split(f"{data}:train", "train", str(data), True)
    assert token_split(hf, f"{data}:train", "measure") == klgap_split(f"{data}:train", "train", str(data), False)
    assert token_split(sources.get("random"), None, "measure") == klgap_split(None, None, None, False)


def klgap_split(arg, split, whole, chosen):
    from klgap.protocols import TokenSplit

    return TokenSplit(arg, split, whole, chosen)


def test_what_a_run_says_of_its_tokens_against_the_sae_s(tmp_path):
    from klgap.job.disjoint import held_out
    from klgap.plan.resolve import token_source
    from klgap.protocols import LoadedSAE

    def sae(training=None):
        return LoadedSAE(module=None, d_in=4, d_sae=8, hook_name=None, source="x",
                         info={"training": training} if training is not None else {})

    root = corpus(tmp_path / "corpus")
    trained = {"dataset": f"text:{root}/train", "token_source": "text", "split": "train",
               "split_of": str(root.resolve()), "seed": 0, "context_len": 32, "tokens": 100, "n_contexts": 4}
    for dataset, status in ((f"text:{root}", "disjoint"), (f"text:{root}/train", "overlap"), ("sample", "unknown")):
        tokens = token_source(dataset, "measure")
        assert held_out(tokens, sae(trained), tokens.spec).status == status, dataset
    random = token_source("random", "measure")
    found = held_out(random, sae(), "random")
    assert found.status == "unknown" and found.why.startswith(
        "the measured tokens (random) are not known to be disjoint from the SAE's training tokens: they are read whole")
    sample_tokens = {"dataset": "sample:train", "token_source": "sample", "split": "train", "split_of": None,
                     "seed": 0, "context_len": 32, "tokens": 100, "n_contexts": 4}
    whole = token_source("sample:all", "measure")  # all of the sample: it holds the training split
    assert (whole.spec, whole.split) == ("sample:all", None)
    assert held_out(whole, sae(sample_tokens), whole.spec).status == "overlap"
    old = held_out(token_source("sample", "measure"), sae({"seed": 0, "steps": 3}), "sample:eval")
    assert old.status == "unknown" and "does not record its tokens" in old.why
    pretrained = held_out(token_source("sample", "measure"), sae(), "sample:eval")
    assert (pretrained.status, pretrained.why, pretrained.trained_on) == ("unknown", None, None)
