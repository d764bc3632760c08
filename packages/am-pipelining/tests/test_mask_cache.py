"""The per-stage mask cache: reused only while everything the mask depends on is unchanged."""

from __future__ import annotations

import functools

import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from am_pipelining import CausalMaskCache, pp_mask_cache, split_model_into_stages
from am_pipelining.mask_cache import build_causal_mask_mapping


def _cfg():
    model = tm.build("gemma3")
    return model.config


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None
        else:
            assert torch.equal(a[k], b[k])


def test_reused_on_same_inputs_rebuilt_on_shape_dtype_change():
    config, cache = _cfg(), CausalMaskCache()
    types = ("full_attention", "sliding_attention")
    x = torch.zeros(2, 12, 32)
    first = cache.get(config, x, None, None, types)
    assert cache.get(config, x, None, None, types) is first and cache.hits == 1
    _same(
        cache.get(config, torch.zeros(2, 10, 32), None, None, types),
        build_causal_mask_mapping(config, torch.zeros(2, 10, 32), None, None, types),
    )
    _same(
        cache.get(config, x.double(), None, None, types),
        build_causal_mask_mapping(config, x.double(), None, None, types),
    )
    assert cache.builds == 3


def test_explicit_attention_mask_is_never_cached():
    config, cache = _cfg(), CausalMaskCache()
    types = ("full_attention",)
    x = torch.zeros(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    a = cache.get(config, x, mask, None, types)
    cache.get(config, x, mask, None, types)
    assert cache.hits == 0 and cache.builds == 2
    # the plain (no-mask) entry afterwards is not the padded one
    plain = cache.get(config, x, None, None, types)
    _same(plain, build_causal_mask_mapping(config, x, None, None, types))
    assert a["full_attention"] is not None


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 11), min_size=2, max_size=2))
def test_packed_after_plain_equals_unsplit(cuts):
    model = tm.build("qwen2_sliding")
    stages = split_model_into_stages(model, 2)
    ids = torch.randint(20, tm.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.stack([torch.cat([torch.arange(c), torch.arange(12 - c)]) for c in cuts])
    with torch.no_grad():
        stages[1](stages[0](ids))  # plain batch first: fills the cache of both stages
        out = stages[1](stages[0](ids, position_ids=pos), position_ids=pos)
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        again = stages[1](stages[0](ids))  # and back to plain
        plain_ref = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, plain_ref, atol=1e-5, rtol=0)


def test_non_first_stage_reuses_mask_across_microbatches():
    stages = split_model_into_stages(tm.build("llama"), 2)
    cache = pp_mask_cache(stages[1])
    hidden = torch.randn(2, 12, 32)
    with torch.no_grad():
        for _ in range(3):
            stages[1](hidden)
    assert cache.builds == 1 and cache.hits == 2


def test_rebuilt_when_a_builder_or_a_config_field_it_reads_changes(monkeypatch):
    import transformers.masking_utils as mu

    config, cache = _cfg(), CausalMaskCache()
    types = ("full_attention",)
    x = torch.zeros(2, 8, 32)
    config.is_causal = False  # the builders fall back to bidirectional masks
    cache.get(config, x, None, None, types)
    config.is_causal = True
    _same(cache.get(config, x, None, None, types), build_causal_mask_mapping(config, x, None, None, types))
    assert cache.builds == 2
    calls = []
    original = mu.create_causal_mask

    def create_causal_mask(*args, **kwargs):  # a patched builder (e.g. another package's) is used at once
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(mu, "create_causal_mask", functools.wraps(original)(create_causal_mask))
    cache.get(config, x, None, None, types)
    assert len(calls) == 1 and cache.builds == 3 and cache.hits == 0
