"""--device-map and --remote on hub models, offline: a tiny model saved to disk stands in for a hub repo.

device_map="auto" must give the same logits as a plain load; --remote must build the meta model, serialize the
trace and reach the NDIF network call (here refused), which becomes a one-line error."""

from __future__ import annotations

import pytest
import torch

from klgap.forward import activations
from klgap.errors import KlgapError
from klgap.protocols import Placement
from klgap_hf.hub import HubAdapter


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory):
    from klgap.plugins.manager import registry

    tiny = registry("model").get("tiny-gpt2").load(torch.device("cpu"), torch.float32)
    folder = tmp_path_factory.mktemp("repo")
    tiny.hf_model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder, tiny


def test_device_map_auto_gives_the_plain_model_logits(saved_repo):
    pytest.importorskip("accelerate")
    folder, tiny = saved_repo
    adapter = HubAdapter(name="tiny-saved", repo_id=str(folder))
    mapped = adapter.load_placed(torch.device("cpu"), torch.float32, Placement(device_map="auto"))
    assert mapped.info["device_map"]["requested"] == "auto" and mapped.info["device_map"]["placed"]
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = mapped.site_map("mlp_out", 1)
    acts, logits = activations.run_clean(mapped, spec, ids)
    ref_acts, ref_logits = activations.run_clean(tiny, tiny.site_map("mlp_out", 1), ids)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(acts, ref_acts)
    patched = activations.run_patched(mapped, spec, ids, acts[:, 3:] * 0.5, positions=slice(3, None))
    ref = activations.run_patched(tiny, tiny.site_map("mlp_out", 1), ids, ref_acts[:, 3:] * 0.5, positions=slice(3, None))
    torch.testing.assert_close(patched, ref)


def test_remote_serializes_the_trace_and_stops_at_the_ndif_call(saved_repo, monkeypatch):
    import websocket

    folder, _ = saved_repo
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise ConnectionRefusedError("no network in this test")

    monkeypatch.setattr(websocket, "create_connection", refuse)
    # nnsight names the model for NDIF by its canonical hub id (one hub lookup, cached): stand in for it
    from nnsight.modeling import huggingface

    monkeypatch.setitem(huggingface._ID_CACHE, str(folder), "openai-community/gpt2")
    remote = HubAdapter(name="tiny-saved", repo_id=str(folder)).load_placed(torch.device("cpu"), torch.float32,
                                                                            Placement(remote=True))
    assert remote.remote and remote.layout is None and remote.kv_cache is False
    assert next(remote.hf_model.parameters()).device.type == "meta"  # nothing downloaded or materialised
    ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(KlgapError, match=r"remote execution on NDIF \(.+\) failed: ConnectionRefusedError.*API key"):
        activations.run_clean(remote, remote.site_map("mlp_out", 0), ids)
    assert len(calls) == 1 and calls[0].endswith("/subscribe")


def test_local_only_models_refuse_remote_and_device_map():
    from klgap.job.loading import load_model

    with pytest.raises(KlgapError, match=r"model 'tiny-gpt2' cannot take --remote"):
        load_model("tiny-gpt2", torch.device("cpu"), torch.float32, Placement(remote=True))
    with pytest.raises(KlgapError, match=r"cannot take --device-map"):
        load_model("tiny-gpt2", torch.device("cpu"), torch.float32, Placement(device_map="auto"))
