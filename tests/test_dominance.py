"""Dominance (conflicting tasks): no leakage of A's query into θ_B, and the layer chosen in the
conflicting setting itself, on dev prompts, rather than borrowed from the main experiment."""

from __future__ import annotations

import pytest

from taskvec.studies.analysis import conflict_prompts, conflicting_tasks
from taskvec.settings import Protocol
from taskvec.tasks import load_task


@pytest.mark.parametrize("pair", [("prev_letter", "next_letter"), ("next_letter", "to_upper"),
                                  ("list_last", "list_first")])
def test_theta_of_b_never_sees_the_query_it_is_patched_into(pair):
    a, b = (load_task(n) for n in pair)
    for split in ("dev", "test"):
        prompts_a, prompts_b = conflict_prompts(a, b, 50, 4, 41, split, 2)
        assert len(prompts_a) == len(prompts_b) == 50
        for pa, pb in zip(prompts_a, prompts_b):
            seen = {e.input for e in (*pb.demonstrations, pb.query, *pb.dummy_queries)}
            assert pa.query.input not in seen, (split, pa.query, pb)
            assert pa.query.input in {e.input for e in b.examples}  # a query both tasks define


def test_dev_and_test_prompts_differ():
    a, b = load_task("list_last"), load_task("list_first")
    dev, _ = conflict_prompts(a, b, 20, 4, 41, "dev", 2)
    test, _ = conflict_prompts(a, b, 20, 4, 41, "test", 2)
    assert [p.query for p in dev] != [p.query for p in test]


def test_conflicting_layer_is_chosen_where_theta_of_b_wins(real_model):
    """list_first is saturated in the main experiment (its best dev layer there is 0-2, where θ does
    nothing: accuracy w.r.t. B was 0.0 at layers 0, 2 and 5). The headline row uses the paper's rule (B's own
    Hypothesis layer, on B's query-only dev prompts); the tuned row chooses in the conflicting setting, lands
    mid-network, and the model follows B. Observed for the tuned row (seed 41, these sizes): layer 11,
    Regular A 1.0, Conflicting B 1.0."""
    out = conflicting_tasks(real_model, load_task("list_last"), load_task("list_first"), Protocol(),
                            n_prompts=12, n_shots=4, n_dev=8)
    table, curve = out.table.set_index("condition"), out.dev_curve
    assert list(table.index) == ["regular", "conflicting", "conflicting_tuned"]
    own = int(table.loc["conflicting", "layer"])
    assert own == int(curve["b_alone"].idxmax())  # the paper's rule: B's own best layer, earliest among ties
    tuned = int(table.loc["conflicting_tuned", "layer"])
    assert tuned == int(curve["acc_b"].idxmax()) and curve.loc[tuned, "acc_b"] == curve["acc_b"].max()
    assert curve.loc[:2, "acc_b"].max() <= 0.2  # early layers: θ of B is overridden (observed 0.0)
    assert 5 <= tuned <= 13
    assert table.loc["regular", "acc_a"] >= 0.6  # without the patch the model follows A (observed 1.0)
    assert table.loc["conflicting_tuned", "acc_b"] >= 0.6  # with θ_B it follows B (observed 1.0)
    assert table.loc["conflicting_tuned", "acc_a"] <= 0.3


def test_a_pair_too_small_for_the_tokenizer_is_skipped_before_any_compute(tiny_gpt2, tmp_path, monkeypatch):
    """A character tokenizer has no single-token Spanish words: the pair is reported as skipped, not an error."""
    from taskvec import mechanism
    from taskvec.publishing import sections

    folder = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    monkeypatch.setattr(mechanism, "_requests", lambda *a, **k: pytest.fail("computed for a skipped pair"))
    out = sections.dominance(str(folder), Protocol(n_dev=2, n_test=2, n_baseline=2), [["en_es", "en_fr"]],
                             n_prompts=4, n_shots=4, n_dev=2, cache_dir=str(tmp_path / "cache"))
    assert out["table"].empty and out["dev_curve"].empty
    assert out["skipped"][["task_a", "task_b"]].values.tolist() == [["en_es", "en_fr"]]
    assert "a prompt needs 5" in out["skipped"]["reason"].iloc[0]
