"""Stage plans (pure) and the cutter."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from am_pipelining import get_stage_plan, split_layer_ranges, split_model_into_stages


@settings(max_examples=50, deadline=None)
@given(costs=st.lists(st.floats(0.1, 10), min_size=1, max_size=12), data=st.data())
def test_ranges_are_contiguous_nonempty_and_cover(costs, data):
    n = data.draw(st.integers(1, len(costs)))
    extra = data.draw(st.floats(0, 20))
    ranges = split_layer_ranges(costs, n, last_stage_extra=extra)
    assert len(ranges) == n and all(len(r) >= 1 for r in ranges)
    assert [i for r in ranges for i in r] == list(range(len(costs)))
    # no worse than the even split by layer count
    even = split_layer_ranges([1.0] * len(costs), n)

    def worst(rs):
        return max(sum(costs[i] for i in r) + (extra if k == n - 1 else 0) for k, r in enumerate(rs))

    assert worst(ranges) <= worst(even) + 1e-6


def test_ranges_reject_bad_stage_counts():
    with pytest.raises(ValueError, match="exceeds"):
        split_layer_ranges([1, 1], 3)
    with pytest.raises(ValueError, match="positive"):
        split_layer_ranges([1, 1], 0)


def test_head_cost_moves_layers_to_earlier_stages():
    assert split_layer_ranges([1.0] * 16, 2, last_stage_extra=4.4) == [range(0, 10), range(10, 16)]


def test_plan_names_for_causal_lm_and_vlm():
    plan = get_stage_plan(tm.build("llama"), 2, layers_per_stage=[1, 3])
    assert plan[0] == ["model.embed_tokens", "model.layers.0", "model.rotary_emb"]
    assert plan[1] == [
        "model.layers.1",
        "model.layers.2",
        "model.layers.3",
        "model.rotary_emb",
        "model.norm",
        "lm_head",
    ]
    vlm = get_stage_plan(tm.build("mistral3"), 2)
    assert "model.vision_tower" in vlm[0] and "model.multi_modal_projector" in vlm[0]
    assert vlm[0][0] == "model.language_model.embed_tokens" and vlm[1][-1] == "lm_head"


def test_plan_works_on_meta_models():
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**tm._common(num_hidden_layers=6)))
    plan = get_stage_plan(model, 3)
    assert sum(n.startswith("model.layers.") for p in plan for n in p) == 6


def test_cut_removes_unowned_parts_and_keeps_names():
    model = tm.build("mistral3")
    names = dict(model.named_parameters())
    first, last = split_model_into_stages(model, 2)
    assert first.lm_head is None and first.model.language_model.norm is None
    assert last.model.language_model.embed_tokens is None and last.model.vision_tower is None
    owned = [set(dict(s.named_parameters())) for s in (first, last)]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(names)
    assert (
        sorted(last.model.language_model.layers.keys()) == ["2", "3"]
        or len(last.model.language_model.layers) >= 1
    )
    # the input model is untouched
    assert len(model.model.language_model.layers) == 4 and model.lm_head is not None


def test_single_stage_index():
    stage = split_model_into_stages(tm.build("llama"), 4, stage_index=2)
    assert list(stage.model.layers.keys()) == ["2"]
    assert stage.model.embed_tokens is None and stage.lm_head is None
