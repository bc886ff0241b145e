"""The heads study's pieces (taskvec.studies.heads): corrupted prompts, mean head outputs, indirect effects,
the average over tasks, the ranking and the function vector, on planted data and against plain PyTorch."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from taskvec.prompts import FewShotPrompt, PromptFormat
from taskvec.studies import heads as H
from taskvec.tasks import Example

from plain import plain_head_patched_logits, plain_heads, plain_logits

TEXTS = ["example:a->b\nexample:c->", "example:hot->cold\nexample:up->down\nexample:big->", "example:x->"]


def _prompt(outputs):
    demos = tuple(Example(f"in{i}", (o,)) for i, o in enumerate(outputs))
    return FewShotPrompt("t", demos, Example("q", ("Q",)), (Example("d", ("D",)),))


def test_shuffled_labels_move_every_answer_and_keep_the_rest():
    prompt = _prompt(["A", "B", "C", "D", "E"])
    for seed in range(20):
        bad = H.shuffled_labels(prompt, seed)
        assert [d.input for d in bad.demonstrations] == [d.input for d in prompt.demonstrations]
        assert sorted(d.output for d in bad.demonstrations) == ["A", "B", "C", "D", "E"]
        assert all(b.output != g.output for b, g in zip(bad.demonstrations, prompt.demonstrations))
        assert bad.query == prompt.query and bad.dummy_queries == prompt.dummy_queries
    assert H.shuffled_labels(prompt, 3) == H.shuffled_labels(prompt, 3)  # seeded
    same = _prompt(["A", "A", "A"])
    assert H.shuffled_labels(same, 0) == same  # nothing can move


def test_mean_head_outputs_are_the_mean_of_each_texts_heads(tiny):
    means = H.mean_head_outputs(tiny, TEXTS)
    assert len(means) == tiny.n_layers
    for layer in (0, tiny.n_layers - 1):
        want = torch.stack([plain_heads(tiny, text, layer) for text in TEXTS]).mean(0)
        torch.testing.assert_close(means[layer], want, atol=1e-5, rtol=1e-4)


def test_indirect_effect_is_the_rise_of_the_targets_probability(tiny_gpt2):
    model = tiny_gpt2
    means = H.mean_head_outputs(model, TEXTS[:2])
    targets = [7, 8, 9]
    effect = H.indirect_effects(model, TEXTS, targets, means, batch_size=5)
    assert effect.shape == (len(TEXTS), model.n_layers, model.arch.head_shape(0)[0])
    layer, head = 1, 2
    for i, text in enumerate(TEXTS):
        clean = plain_logits(model, text).softmax(-1)[targets[i]]
        patched = plain_head_patched_logits(model, text, layer, [head], means[layer][head:head + 1]).softmax(-1)
        assert float(effect[i, layer, head]) == pytest.approx(float(patched[targets[i]] - clean), abs=1e-5)


def test_the_average_counts_only_tasks_done_in_context_and_the_ranking_flips_with_it():
    """Planted: task a (done in context) peaks at head (1, 0); task b (not done) has a larger peak at (0, 2).
    Left out, b cannot move the ranking; counted, it would."""
    a = torch.zeros(2, 3)
    a[1, 0] = 0.2
    b = torch.zeros(2, 3)
    b[0, 2] = 0.9
    effects = {"a": a, "b": b}
    assert H.top_heads(H.average_indirect_effect(effects, {"a": True, "b": False}), 1) == [(1, 0)]
    assert H.top_heads(H.average_indirect_effect(effects, {"a": True, "b": True}), 1) == [(0, 2)]
    with pytest.raises(ValueError, match="no task the model does in context"):
        H.average_indirect_effect(effects, {"a": False, "b": False})


def test_top_heads_are_ordered_and_checked():
    effect = torch.tensor([[0.1, 0.5], [0.5, -1.0]])
    assert H.top_heads(effect, 3) == [(0, 1), (1, 0), (0, 0)]  # a tie goes to the earlier layer
    with pytest.raises(ValueError, match="k must be in 1..4"):
        H.top_heads(effect, 5)


def test_function_vector_is_the_sum_of_the_heads_shares(tiny):
    """The FV is the sum of the chosen heads' projected means; where the block normalises its attention output
    (Gemma 3), each times the norm's weight over the scale of all the layer's heads at their means."""
    means = H.mean_head_outputs(tiny, TEXTS)
    chosen = [(0, 1), (tiny.n_layers - 1, 0), (0, 0)]
    fv = H.function_vector(tiny, means, chosen)
    want = torch.zeros(tiny.d_model)
    for layer, head in chosen:
        n_heads, head_dim = tiny.arch.head_shape(layer)
        x = torch.zeros(1, n_heads * head_dim)
        x[0, head * head_dim:(head + 1) * head_dim] = means[layer][head]
        proj = tiny.arch.head_module(tiny.hf, layer)
        with torch.no_grad():
            share = (proj(x) - proj(torch.zeros_like(x)))[0]
            if tiny.arch.head_norm:
                whole = proj(means[layer].reshape(1, -1))[0]
                norm = tiny.arch.get(tiny.arch.layer_modules(tiny.hf)[layer], tiny.arch.head_norm)
                share = share * norm(whole[None, None])[0, 0] / whole
        want += share
    torch.testing.assert_close(fv, want, atol=1e-4, rtol=1e-4)


def test_answer_token_is_the_first_token_after_the_query_line(tiny_gpt2):
    fmt = PromptFormat()
    token = H.answer_token(tiny_gpt2.tokenizer, fmt, Example("a", ("b",)))
    full = tiny_gpt2.tokenizer(fmt.query("a") + fmt.answer("b")).input_ids
    assert token == full[-1]


def test_the_task_study_is_cached_and_not_computed_again(tiny_gpt2, tmp_path, monkeypatch):
    from taskvec.settings import Protocol
    from taskvec.store import Store
    from taskvec.tasks import Task

    examples = tuple(Example(c, (c.upper(),)) for c in "abcdefghijklmnop")
    task = Task("upper", "test", "lower to upper", "exact", examples)
    tiny = Task("tiny", "test", "too few", "exact", examples[:3])
    store = Store(tmp_path)
    sizes = H.HeadSizes(n_mean=4, n_corrupt=3)
    first = H.run(tiny_gpt2, [task, tiny], Protocol(), sizes, store=store, progress=False)
    assert list(first) == ["upper"]  # the task with too few examples is skipped, not an error
    result = first["upper"]
    assert result.effect.shape == (3, tiny_gpt2.n_layers, tiny_gpt2.arch.head_shape(0)[0]) and len(result.regular) == 4
    monkeypatch.setattr(H, "task_heads", lambda *a, **k: pytest.fail("a cached unit is not computed again"))
    again = H.run(tiny_gpt2, [task, tiny], Protocol(), sizes, store=store, progress=False)
    torch.testing.assert_close(again["upper"].effect, result.effect)
    torch.testing.assert_close(again["upper"].means[1], result.means[1])
    assert again["upper"].regular == result.regular


def _upper_task(n=16):
    from taskvec.tasks import Task

    return Task("upper", "test", "lower to upper", "exact",
                tuple(Example(c, (c.upper(),)) for c in "abcdefghijklmnopqrstuvwxyz"[:n]))


def _constant_task():
    from taskvec.tasks import Task

    return Task("zed", "test", "anything to Z", "exact", tuple(Example(c, ("Z",)) for c in "abcdefghijklmnop"))


def test_a_function_vector_that_writes_the_answer_does_the_task_and_a_zero_one_does_not(tiny_gpt2):
    """Planted: every answer is Z; a vector along Z's unembedding row, added after the last layer, makes
    every dev query answer Z; the zero vector leaves the queries' own answers (not Z)."""
    from taskvec.settings import Protocol

    model, protocol = tiny_gpt2, Protocol()
    z = model.tokenizer("Z", add_special_tokens=False).input_ids[0]
    writes_z = model.hf.lm_head.weight[z].detach() * 50
    dev = H.fv_dev_sweep(model, _constant_task(), protocol, {1: writes_z, 2: torch.zeros(model.d_model)}, n_dev=8)
    accuracy = dev.groupby(["k", "layer"])["correct"].mean()
    assert accuracy[(1, model.n_layers - 1)] == 1.0
    assert (accuracy.loc[2] == 0.0).all()
    assert H.choose_fv(dev) == (1, int(accuracy.loc[1].idxmax()))


def test_choose_fv_prefers_fewer_heads_then_earlier_layers_on_ties():
    import pandas as pd

    rows = [{"k": k, "layer": layer, "query": 0, "correct": ok}
            for k, layer, ok in [(1, 0, False), (1, 3, True), (3, 2, True), (3, 1, True), (5, 0, True)]]
    assert H.choose_fv(pd.DataFrame(rows)) == (1, 3)
    rows.append({"k": 1, "layer": 3, "query": 1, "correct": False})  # (1, 3) now 0.5: the others win
    assert H.choose_fv(pd.DataFrame(rows)) == (3, 1)


def test_side_by_side_conditions_and_their_invariants(tiny_gpt2):
    """With a zero FV, the FV on the query alone is Baseline exactly; every condition scores every query."""
    from taskvec.settings import Protocol

    frame = H.side_by_side(tiny_gpt2, _upper_task(), Protocol(), 1, torch.zeros(tiny_gpt2.d_model), 2, n_test=6)
    assert list(frame["condition"].unique()) == list(H.CONDITIONS[:-2])  # no heads to ablate given
    assert (frame.groupby("condition").size() == 6).all()
    by = frame.pivot(index="query", columns="condition", values="correct")
    assert by["fv_query"].tolist() == by["baseline"].tolist()


def test_theta_fv_cosine_is_one_along_theta_minus_the_query_state_and_minus_one_against(tiny_gpt2):
    from taskvec import mechanism
    from taskvec.prompts import sample_prompts
    from taskvec.settings import Protocol

    model, protocol, task, layer = tiny_gpt2, Protocol(), _upper_task(), 2
    fmt, usable = protocol.usable(task, model.tokenizer)
    prompts = sample_prompts(usable, 5, protocol.n_shots, protocol.seed, "heads-test", protocol.n_dummies)
    theta = mechanism.task_vectors(model, [p.dummy_texts(fmt) for p in prompts])[:, layer].mean(0)
    alone = mechanism.hidden_states(model, [p.query_text(fmt) for p in prompts])[:, layer].mean(0)
    assert H.theta_fv_cosine(model, task, protocol, layer, theta - alone, n_prompts=5) == pytest.approx(1.0, abs=1e-5)
    assert H.theta_fv_cosine(model, task, protocol, layer, alone - theta, n_prompts=5) == pytest.approx(-1.0, abs=1e-5)


def test_heads_after_thetas_layer_cannot_change_it_and_heads_before_can(tiny_gpt2):
    """The ablated Hypothesis reads θ after ``layer``: heads set in a later layer leave it exactly Hypothesis,
    heads set in an earlier one (large values) change θ, so the condition measures what it says."""
    from taskvec.settings import Protocol

    n_heads, head_dim = tiny_gpt2.arch.head_shape(0)
    big = torch.full((n_heads, head_dim), 50.0)
    args = (tiny_gpt2, _upper_task(), Protocol(), 1, torch.zeros(tiny_gpt2.d_model), 2)
    later = H.side_by_side(*args, n_test=8, ablate={3: (list(range(n_heads)), big)},
                           ablate_other={2: ([0], big[:1])})
    by = later.pivot(index="query", columns="condition", values="correct")
    assert list(later["condition"].unique()) == list(H.CONDITIONS)
    assert by["hypothesis_ablated"].tolist() == by["hypothesis"].tolist()
    assert by["hypothesis_ablated_other"].tolist() == by["hypothesis"].tolist()
    from taskvec import mechanism
    fmt, usable = Protocol().usable(_upper_task(), tiny_gpt2.tokenizer)
    prompts = H.heads_test_prompts(_upper_task(), Protocol(), tiny_gpt2.tokenizer, 8)
    dummies = [p.dummy_texts(fmt) for p in prompts]
    plain = mechanism.task_vectors(tiny_gpt2, dummies)
    earlier = mechanism.task_vectors(tiny_gpt2, dummies, heads={0: (list(range(n_heads)), big)})
    assert not torch.allclose(plain[:, 1], earlier[:, 1], atol=1e-2)


def test_the_fv_study_is_cached_ranked_over_tasks_done_in_context_and_tested_on_unseen_queries(tiny_gpt2, tmp_path,
                                                                                               monkeypatch):
    from taskvec.settings import Protocol
    from taskvec.store import Store

    store, task, protocol = Store(tmp_path), _upper_task(26), Protocol(n_shots=3)
    sizes, fv_sizes = H.HeadSizes(n_mean=4, n_corrupt=3), H.FvSizes(ks=[1, 2], n_fv_dev=5, n_fv_test=6, n_ablate=2)
    first = H.run_all(tiny_gpt2, [task], protocol, {"upper": 1}, sizes, fv_sizes, store=store, progress=False)
    fv = first.fv["upper"]
    assert fv.k in (1, 2) and 0 <= fv.fv_layer < tiny_gpt2.n_layers and -1 <= fv.cosine <= 1
    assert set(fv.side["condition"]) == set(H.CONDITIONS) and len(fv.side) == 6 * len(H.CONDITIONS)
    assert len(fv.dev) == 2 * tiny_gpt2.n_layers * 5 and len(first.ranking) == 2
    # the ranking is over the tasks done in context, or over all when the model (random here) does none
    assert first.ranked_on == ([t for t, ok in first.does_icl.items() if ok] or ["upper"])
    effect = H.effect_table(first)
    assert set(effect["task"]) == {"upper", "average"} and len(effect) == 2 * tiny_gpt2.n_layers * 4
    table = H.conditions_table(first)
    assert set(table["task"]) == {"upper", "all"} and (table["n"] == 6).all()
    test = H.paired(first, "fv_query", "baseline")
    assert test["n"] == 6 and 0 <= test["p_value"] <= 1
    monkeypatch.setattr(H, "task_fv", lambda *a, **k: pytest.fail("a cached unit is not computed again"))
    monkeypatch.setattr(H, "task_heads", lambda *a, **k: pytest.fail("a cached unit is not computed again"))
    again = H.run_all(tiny_gpt2, [task], protocol, {"upper": 1}, sizes, fv_sizes, store=store, progress=False)
    assert again.fv["upper"].side.equals(fv.side) and again.fv["upper"].k == fv.k and again.ranking == first.ranking
    assert fv.words.empty and again.fv["upper"].words.empty and list(again.fv["upper"].words.columns) == [
        "query", "condition", "correct"]  # no template for this task: nothing in words, stored and read back
    assert H.paired(again, "words_fv", "words", part="words")["n"] == 0


def test_top_heads_never_picks_a_missing_head():
    """Layers with fewer heads leave NaN cells in the map (head_sweep_probs fills them so): never ranked."""
    effect = torch.tensor([[0.1, float("nan")], [0.3, 0.2]])
    assert H.top_heads(effect, 3) == [(1, 0), (1, 1), (0, 0)]
    with pytest.raises(ValueError, match="at most the 3 heads"):
        H.top_heads(effect, 4)


def test_queries_in_words_zero_fv_is_the_words_alone_and_tasks_without_a_template_have_none(tiny_gpt2, monkeypatch):
    from taskvec.settings import Protocol

    task = _upper_task()
    args = (tiny_gpt2, task, Protocol(), 1, torch.zeros(tiny_gpt2.d_model), 2)
    assert H.in_words(*args, n_test=5).empty  # no template for this task
    monkeypatch.setitem(H.TEMPLATES, "upper", "Big {x} is")
    assert H.words_format("upper").query("q") == "Big q is" and H.words_format("upper").line("q", "Q") == "Big q is Q"
    frame = H.in_words(*args, n_test=5)
    assert list(frame["condition"].unique()) == list(H.WORDS_CONDITIONS) and len(frame) == 15
    by = frame.pivot(index="query", columns="condition", values="correct")
    assert by["words_fv"].tolist() == by["words"].tolist()


def test_every_template_reads_its_input_once_and_names_a_real_task():
    from taskvec import list_tasks

    assert set(H.TEMPLATES) <= set(list_tasks())
    for name, template in H.TEMPLATES.items():
        assert template.count("{x}") == 1 and not template.endswith(" "), name


def test_one_test_pass_serves_every_comparison_as_each_would_compute_it(tiny_gpt2):
    """θ of the test prompts read once (test_pass) gives the same conditions and cosine as each function reading
    it itself, and its Baseline is the query alone's next token."""
    from taskvec import mechanism
    from taskvec.settings import Protocol

    task, protocol, fv = _upper_task(), Protocol(), torch.randn(tiny_gpt2.d_model)
    test = H.test_pass(tiny_gpt2, task, protocol, 6)
    args = (tiny_gpt2, task, protocol, 1, fv, 2, 6)
    pd.testing.assert_frame_equal(H.side_by_side(*args, test=test), H.side_by_side(*args))
    assert H.theta_fv_cosine(tiny_gpt2, task, protocol, 1, fv, 6, test=test) == pytest.approx(
        H.theta_fv_cosine(tiny_gpt2, task, protocol, 1, fv, 6), abs=1e-6)
    fmt, _ = protocol.usable(task, tiny_gpt2.tokenizer)
    alone = mechanism.next_tokens(tiny_gpt2, [p.query_text(fmt) for p in test.prompts])
    assert test.baseline.tolist() == alone.tolist()
