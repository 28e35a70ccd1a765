"""The concept graph's arithmetic: which rows measure a side effect, and Δ from them."""

from erase import graph


def _row(prompt, concept):
    return {"prompt": prompt, "concept": concept, "kind": "concept"}


def test_side_effect_rows_leave_out_other_concepts_prompts_that_name_the_erased_one():
    rows = [_row("a red striped cross", "cross"), _row("a blue solid cross", "cross"),
            _row("a red striped circle", "circle"), _row("a red striped cross", "striped"),
            _row("a green, striped square", "striped"), _row("a red crossbow", "red")]
    kept = graph.rows_for_side_effects(rows, "cross")
    # the cross's own prompts stay (the diagonal is the erasure); a striped cross is not a side effect on striped
    assert [(r["prompt"], r["concept"]) for r in kept] == [
        ("a red striped cross", "cross"), ("a blue solid cross", "cross"), ("a red striped circle", "circle"),
        ("a green, striped square", "striped"), ("a red crossbow", "red")]  # whole words only
    assert len(graph.rows_for_side_effects(rows, "striped")) == 4  # the striped cross and circle of others go


def test_side_effects_subtract_each_erasures_own_base_rates():
    base = {"cross": {"cross": 0.9, "striped": 0.8}, "striped": {"cross": 1.0, "striped": 0.85}}
    after = {"cross": {"cross": 0.1, "striped": 0.8}, "striped": {"cross": 0.9, "striped": 0.05}}
    delta = graph.side_effects(base, after)
    assert delta["cross"]["cross"] == 0.9 - 0.1 and delta["cross"]["striped"] == 0.0
    assert abs(delta["striped"]["cross"] - 0.1) < 1e-9
    assert graph.nearest_neighbours(delta, "striped", 1) == ["cross"]
