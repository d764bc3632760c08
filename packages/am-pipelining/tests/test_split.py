"""Stage plans (pure) and the cutter."""

from __future__ import annotations

import copy
import types

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from am_pipelining import get_stage_plan, split_model_into_stages
from am_pipelining.split import cut_stage, plan_stages, split_layer_ranges


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
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        split_layer_ranges([1, 1], 0)
    with pytest.raises(TypeError, match="num_stages must be an int"):
        split_layer_ranges([1, 1], 1.0)


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
        model = tf.LlamaForCausalLM(tm.config("llama", layers=6))
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
    # the planned split (parameter-balanced with the head on the last stage) is what the cutter did
    planned = get_stage_plan(model, 2)
    for stage, names in zip((first, last), planned):
        held = [f"model.language_model.layers.{k}" for k in stage.model.language_model.layers.keys()]
        assert held == [n for n in names if ".layers." in n] and held
    assert list(first.model.language_model.layers.keys()) == ["0", "1"]
    assert list(last.model.language_model.layers.keys()) == ["2", "3"]
    # the input model is untouched
    assert len(model.model.language_model.layers) == 4 and model.lm_head is not None


def test_single_stage_index():
    stage = split_model_into_stages(tm.build("llama"), 4, stage_index=2)
    assert list(stage.model.layers.keys()) == ["2"]
    assert stage.model.embed_tokens is None and stage.lm_head is None


def _doubled_mlp(self, x):
    """A stand-in for a kernel patch: the MLP with its output doubled (so the patch visibly runs)."""
    return 2.0 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _closure_patch(module, marker: str | None = "tests.closure_mlp"):
    def forward(x):
        return _doubled_mlp(module, x)  # closes over `module`: deepcopy cannot rebind this

    if marker:
        forward.__am_patch__ = marker
    module.forward = forward


def _method_patch(module):
    _doubled_mlp.__am_patch__ = "tests.method_mlp"
    module.forward = types.MethodType(_doubled_mlp, module)


def _ids():
    return torch.randint(20, tm.VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("marker", ["tests.closure_mlp", None])
def test_split_refuses_forward_patches_that_close_over_the_model(marker):
    # marked: caught before copying; unmarked: caught after the copy (still reaches the original)
    model = tm.build("llama")
    _closure_patch(model.model.layers[1].mlp, marker)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.forward.*after splitting.*MethodType"):
        split_model_into_stages(model, 2)
    # a stage that does not hold the patched layer is unaffected
    assert list(split_model_into_stages(model, 4, stage_index=3).model.layers.keys()) == ["3"]


def test_split_rebinds_method_type_patches_to_the_stage_weights():
    model = tm.build("llama")
    for layer in model.model.layers:
        _method_patch(layer.mlp)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        plain = tm.build("llama")(input_ids=ids, use_cache=False).logits
    assert (ref - plain).abs().max() > 1e-2  # the patch changes the numbers, so it is really running
    stages = split_model_into_stages(model, 2)
    for stage in stages:
        for idx, layer in stage.model.layers.items():
            assert layer.mlp.forward.__self__ is layer.mlp is not model.model.layers[int(idx)].mlp
    # wipe the original's MLP weights: the stages must not notice
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
        out = stages[1](stages[0](ids))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)  # fp32, same ops


def test_split_refuses_methods_bound_to_modules_the_stage_drops():
    model = tm.build("llama")
    _doubled_mlp.__am_patch__ = "tests.method_mlp"
    model.model.layers[0].mlp.forward = types.MethodType(_doubled_mlp, model.model.layers[3].mlp)
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.mlp\.forward \(patch 'tests.method_mlp'\).*bound to model\.layers\.3\.mlp",
    ):
        split_model_into_stages(model, 2, stage_index=0)


def test_cut_stage_refuses_a_copy_whose_patch_reaches_the_original():
    model = tm.build("llama")
    _closure_patch(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.forward.*outside it.*after splitting"):
        cut_stage(copy.deepcopy(model), 2, 0)
    copied = copy.deepcopy(model)
    copied.model.layers[0].mlp.forward = types.MethodType(_doubled_mlp, copied.model.layers[1].mlp)
    with pytest.raises(
        ValueError, match=r"bound to another module \(LlamaMLP\), not to model\.layers\.0\.mlp"
    ):
        cut_stage(copied, 2, 0)


def test_split_refuses_a_handle_holding_methods_bound_to_dropped_modules():
    # e.g. a patch handle kept on the model: deepcopy would rebind its methods to the dropped layers (None)
    model = tm.build("llama")
    _method_patch(model.model.layers[3].mlp)
    model._handle = types.SimpleNamespace(patched=[model.model.layers[3].mlp.forward])
    with pytest.raises(
        ValueError, match=r"^_handle\.patched\[0\] \(patch 'tests.method_mlp'\).*layers\.3\.mlp"
    ):
        split_model_into_stages(model, 2, stage_index=0)
    assert split_model_into_stages(model, 2, stage_index=1)._handle.patched[0].__self__ is not None


@pytest.mark.parametrize("arch", ["llama", "mistral3", "qwen2_vl"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_plan_partitions_the_parameters_and_the_cutter_follows_it(arch, num_stages):
    model = tm.build(arch)
    names = [n for n, _ in model.named_parameters()]

    def under(prefixes):
        return {n for n in names if any(n.startswith(p + ".") for p in prefixes)}

    plans = plan_stages(model, num_stages)
    assert [i for p in plans for i in p.layers] == list(range(4))
    owned = [under(p.owned) for p in plans]
    for plan, mine in zip(plans, owned):
        assert not set(plan.owned) & set(plan.dropped)
        assert mine | under(plan.dropped) == set(names)  # every parameter is owned or dropped
    assert sum(len(o) for o in owned) == len(names)  # ... and owned by exactly one stage
    for mine, stage in zip(owned, split_model_into_stages(model, num_stages)):
        assert {n for n, _ in stage.named_parameters()} == mine
