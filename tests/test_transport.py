"""How mechanism.py moves work: usage counted per scope (no module global), typed payloads that can
cross to a server running another Python, and the one module holding the libraries' private APIs."""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

import pytest
import torch

from taskvec import compat, mechanism
from taskvec.arch import residual
from conftest import tiny_model

TEXTS = ["example:a->b\nexample:c->", "example:x->", "example:hot->cold\nexample:up->"]
PAYLOADS = [mechanism.PlainPayload, mechanism.VocabPayload, mechanism.Patch, mechanism.PatchedPayload,
            mechanism.PrefixPayload, mechanism.GeneratePayload]


# --- usage -------------------------------------------------------------------------------------

def test_usage_is_counted_only_inside_a_scope(tiny_gpt2):
    assert not hasattr(mechanism, "USAGE")
    mechanism.next_tokens(tiny_gpt2, TEXTS, phase="outside")  # no scope open: nothing to count into
    with mechanism.track_usage() as outer:
        mechanism.next_tokens(tiny_gpt2, TEXTS, batch_size=2, phase="a")
        with mechanism.track_usage() as inner:
            mechanism.next_tokens(tiny_gpt2, TEXTS, phase="b")
    assert set(outer.by_phase) == {"a", "b"} and set(inner.by_phase) == {"b"}
    assert (outer.by_phase["a"]["requests"], outer.by_phase["a"]["traces"], outer.by_phase["a"]["rows"]) == (1, 2, 3)
    assert outer.by_phase["b"] == inner.by_phase["b"]
    assert outer.total("rows") == 6 and outer.total("heads") == 6
    mechanism.next_tokens(tiny_gpt2, TEXTS, phase="after")
    assert set(outer.by_phase) == {"a", "b"}  # a closed scope counts no more


def test_a_failed_request_is_not_counted(tiny_gpt2):
    wrong = torch.zeros(1, tiny_gpt2.n_layers, tiny_gpt2.d_model + 1)  # one too wide: the write fails
    with mechanism.track_usage() as usage, pytest.raises(Exception):
        mechanism.patched_next_tokens(tiny_gpt2, TEXTS[:1], wrong, [1], phase="boom")
    assert usage.by_phase == {}


def test_usage_scopes_of_other_threads_are_their_own(tiny_gpt2):
    seen = {}

    def run(name):
        with mechanism.track_usage() as usage:
            mechanism.next_tokens(tiny_gpt2, TEXTS[:1], phase=name)
        seen[name] = set(usage.by_phase)

    with mechanism.track_usage() as main:
        thread = threading.Thread(target=run, args=("thread",))
        thread.start()
        thread.join()
    assert seen == {"thread": {"thread"}} and main.by_phase == {}


# --- units and payloads ------------------------------------------------------------------------

def test_a_unit_is_built_by_name_only():
    fields = dict(payload=None, result_bytes=1, sent_bytes=2, traces=3, rows=4, tokens=5, heads=6)
    unit = mechanism._Unit(**fields)
    assert dataclasses.asdict(unit) == fields
    with pytest.raises(TypeError):
        mechanism._Unit(None, 1, 2, 3, 4, 5, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        unit.rows = 0


@pytest.mark.parametrize("cls", PAYLOADS, ids=lambda cls: cls.__name__)
def test_a_payload_runs_none_of_its_generated_code_on_the_server(cls):
    """Dataclass-generated methods travel as the client Python's bytecode; a server on another Python
    crashes running them. A payload is rebuilt by filling its __dict__, and offers no generated
    __eq__, __hash__ or __repr__ for anything there to call; it is no tuple (one calls its __new__)."""
    assert dataclasses.is_dataclass(cls) and not issubclass(cls, tuple)
    assert cls.__dataclass_params__.frozen
    assert all(field.kw_only for field in dataclasses.fields(cls))
    for method in ("__eq__", "__hash__", "__repr__", "__reduce__", "__reduce_ex__", "__getstate__", "__setstate__"):
        assert getattr(cls, method, None) is getattr(object, method, None), method


def test_generate_and_vocab_through_serialization_equal_local(tiny_gpt2):
    """remote="local" pickles each session as a remote run does (taskvec's code by value) and runs it here."""
    model = tiny_gpt2
    vectors = torch.randn(len(TEXTS), model.d_model, generator=torch.Generator().manual_seed(2)) * 3
    local = (mechanism.generate(model, TEXTS, 4), mechanism.generate(model, TEXTS, 4, vectors, 1),
             mechanism.vocab_logits(model, vectors))
    model.remote = "local"
    try:
        far = (mechanism.generate(model, TEXTS, 4), mechanism.generate(model, TEXTS, 4, vectors, 1),
               mechanism.vocab_logits(model, vectors))
    finally:
        model.remote = False
    assert far[:2] == local[:2]
    torch.testing.assert_close(far[2], local[2])


def test_vocab_logits_are_the_models_own_read_out(tiny_gpt2):
    vectors = torch.randn(2, tiny_gpt2.d_model, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = tiny_gpt2.hf.lm_head(tiny_gpt2.hf.transformer.ln_f(vectors))
    torch.testing.assert_close(mechanism.vocab_logits(tiny_gpt2, vectors), want)


def _last_layer_state_and_logits(model):
    """The last layer's output at the last position of a prompt, and the model's own logits there."""
    ids = model.tokenizer("example:ab->", return_tensors="pt").input_ids
    seen = {}
    last = model.arch.layer_modules(model.hf)[model.n_layers - 1]

    def keep(mod, args, out):  # returns None: the output goes on unchanged
        seen["h"] = residual(out)[0, -1].clone()

    handle = last.register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0, -1]
    finally:
        handle.remove()
    return seen["h"], logits


def test_vocab_logits_of_the_last_layer_are_the_models_next_token_logits(tiny):
    state, logits = _last_layer_state_and_logits(tiny)
    torch.testing.assert_close(mechanism.vocab_logits(tiny, state[None, :])[0], logits, rtol=1e-4, atol=1e-4)


def test_vocab_logits_apply_the_final_soft_cap_as_the_forward_does():
    """Gemma 2's ``final_logit_softcapping`` (null for Gemma 3, whose forward applies it when set): 0.5 here, so
    that it bites on these small logits; the read-out must give the capped logits the model itself gives."""
    model = tiny_model("gemma3", final_logit_softcapping=0.5)
    state, logits = _last_layer_state_and_logits(model)
    assert logits.abs().max() <= 0.5
    torch.testing.assert_close(mechanism.vocab_logits(model, state[None, :])[0], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mechanism.next_tokens(model, ["example:ab->"], return_logits=True)[0], logits,
                               rtol=1e-4, atol=1e-4)
    uncapped = tiny_model("gemma3")  # same weights (seed 0), no cap
    assert mechanism.vocab_logits(uncapped, state[None, :])[0].abs().max() > 0.5  # the cap made the difference


# --- the libraries' private APIs ---------------------------------------------------------------

def test_a_selected_cache_is_a_copy_with_those_rows(tiny_gpt2):
    model = tiny_gpt2
    enc = mechanism.encode(model, TEXTS[:2])
    with torch.no_grad():
        cache = model.hf(**enc, use_cache=True).past_key_values
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    rows = torch.tensor([1, 0, 1])
    chosen = compat.select_cache_rows(cache, rows)
    for layer, new, (keys, values) in zip(cache.layers, chosen.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)  # the original is intact
        assert torch.equal(new.keys, keys[rows]) and torch.equal(new.values, values[rows])


def test_torch_module_is_the_wrapped_module(tiny_gpt2):
    assert isinstance(compat.torch_module(tiny_gpt2.nn), torch.nn.Module)
    assert compat.torch_module(tiny_gpt2.nn) is tiny_gpt2.hf


def test_private_apis_are_reached_only_through_compat():
    private = re.compile(r"\._module\b|_ID_CACHE|hf_quantizer|batch_select_indices")
    package = Path(compat.__file__).parent
    found = [f"{path.relative_to(package)}:{n}: {line.strip()}" for path in sorted(package.rglob("*.py"))
             if path.name != "compat.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if private.search(line)]
    assert not found, "\n".join(found)
