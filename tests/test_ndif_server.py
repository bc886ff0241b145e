"""The local NDIF server harness, proved with a real nnsight client: remote traces equal local ones.

nnsight directly (not taskvec's mechanism code), against the real ndif 0.1.2 server over HTTP.
"""

from __future__ import annotations

import json
import urllib.request

import nnsight
import pytest
import torch

pytest_plugins = ["ndif_server"]

PROMPT = "example:hot->cold\nexample:up->"


@pytest.fixture(scope="module")
def tiny_client(ndif_server):
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return ndif_server.client("tiny")


def test_models_are_served_under_the_client_key(ndif_server, tiny_client):
    keys = ndif_server.state["models"]
    assert set(keys) == set(ndif_server.models.values())
    assert keys[ndif_server.models["tiny"]] == tiny_client.to_model_key()
    # The deprecated LanguageModel alias computes the same key.
    with pytest.warns(Warning, match="LanguageModel is deprecated"):
        alias = nnsight.LanguageModel(ndif_server.models["tiny"], tokenizer=tiny_client.tokenizer)
    assert keys[ndif_server.models["tiny"]] == alias.to_model_key()
    with urllib.request.urlopen(f"{ndif_server.host}/status", timeout=30) as response:
        status = json.loads(response.read())
    running = [name for name, info in status["deployments"].items() if info["application_state"] == "RUNNING"]
    assert len(running) == len(ndif_server.models)


def test_remote_read_equals_local(ndif_server, tiny_client):
    model = tiny_client
    with model.trace(PROMPT):
        local = model.model.layers[1].output.save()
    with model.trace(PROMPT, remote=ndif_server.host):
        remote = model.model.layers[1].output.save()
    assert isinstance(remote, torch.Tensor) and remote.shape == local.shape == (1, len(PROMPT) + 1, 32)
    torch.testing.assert_close(remote, local, atol=1e-5, rtol=0)


def test_remote_patch_then_logits_equals_local(ndif_server, tiny_client):
    model = tiny_client
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3)) * 5

    def run(remote):
        with model.trace(PROMPT, remote=remote):
            model.model.layers[0].output[:, -1, :] += vector
            logits = model.lm_head.output.save()
        return logits

    with model.trace(PROMPT):
        plain = model.lm_head.output.save()
    local, remote = run(False), run(ndif_server.host)
    assert remote.shape == (1, len(PROMPT) + 1, model.config.vocab_size)
    assert not torch.allclose(local[0, -1], plain[0, -1], atol=1e-3)  # the patch changed the answer
    torch.testing.assert_close(remote, local, atol=1e-5, rtol=0)


def test_gemma_remote_next_token_equals_local(ndif_server):
    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    model = ndif_server.client("gemma")
    prompt = "France -> Paris\nJapan -> Tokyo\nItaly ->"
    with model.trace(prompt, remote=ndif_server.host):
        remote = model.lm_head.output[0, -1].save()
    with model.trace(prompt):
        local = model.lm_head.output[0, -1].save()
    assert remote.argmax() == local.argmax()
    # The server's torch is another build (CUDA wheel, run on the CPU): same values up to summation order.
    torch.testing.assert_close(remote, local, atol=1e-3 * local.abs().max().item(), rtol=0)


def test_tiny_is_conftest_tiny_llama(ndif_server, tiny_client):
    from conftest import tiny_model

    local = tiny_model("llama")
    with local.nn.trace(PROMPT):
        expected = local.nn.lm_head.output.save()
    with tiny_client.trace(PROMPT, remote=ndif_server.host):
        served = tiny_client.lm_head.output.save()
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)


def test_nothing_of_the_stack_can_be_reached_from_outside_this_machine(ndif_server):
    """Ray binds services on every interface whatever its flags say: the stack runs in a network namespace
    whose only interface is loopback, and only a bridge listens here, on 127.0.0.1. Checked two ways: the
    harness's own check over the stack's whole process tree, and `ss -ltnp` of this machine's namespace."""
    import ipaddress
    import re
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from ndif_local import netns
    from ndif_local.stack import Stack

    stack = Stack(ndif_server.dir)
    processes = stack.processes()
    assert len(processes) > 5  # redis, moto, Ray's daemons, the controller's actors, the API, the bridge
    assert netns.exposure(processes) == []
    ours = netns.namespace_of()
    inside = [p for p in processes if netns.namespace_of(p.pid) not in (ours, "")]
    assert len(inside) > 5 and {netns.namespace_of(p.pid) for p in inside} == {netns.namespace_of(inside[0].pid)}
    assert netns.interfaces(inside[0].pid) == ["lo"]  # Ray and the rest see loopback only
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    pids = {p.pid for p in processes}
    mine = [line for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert mine, "the bridge listens here"
    for line in mine:  # whatever of the stack listens in this machine's namespace, listens on loopback
        address = line.split()[3].rsplit(":", 1)[0].strip("[]")
        assert ipaddress.ip_address(address.split("%")[0]).is_loopback, line
    assert re.search(r"127\.0\.0\.1:%d\b" % int(ndif_server.host.rsplit(":", 1)[1]), "\n".join(mine))
