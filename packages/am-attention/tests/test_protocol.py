"""The patch protocol for every public patcher: idempotent, exactly undone, refuses foreign re-patches, checked."""

from __future__ import annotations

import sys

import pytest
import transformers
from transformers import PreTrainedModel, masking_utils, modeling_utils

import am_attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build


def _registries():
    return (
        dict(modeling_utils.AttentionInterface._global_mapping),
        dict(masking_utils.AttentionMaskInterface._global_mapping),
    )


def test_legacy_flag_protocol(monkeypatch):
    before = dict(vars(PreTrainedModel))
    h1 = A.patch_legacy_flash_attn_flag()
    after_once = dict(vars(PreTrainedModel))
    assert A.patch_legacy_flash_attn_flag() is h1 and dict(vars(PreTrainedModel)) == after_once
    A.unpatch_legacy_flash_attn_flag()
    assert dict(vars(PreTrainedModel)) == before
    assert vars(PreTrainedModel)["_supports_flash_attn"] is before["_supports_flash_attn"]
    # foreign re-patch on top of ours
    A.patch_legacy_flash_attn_flag()
    ours = vars(PreTrainedModel)["_supports_flash_attn"]
    PreTrainedModel._supports_flash_attn = property(lambda self: True)
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        A.unpatch_legacy_flash_attn_flag()
    PreTrainedModel._supports_flash_attn = ours  # the foreign patch is undone first, then ours
    A.unpatch_legacy_flash_attn_flag()
    assert dict(vars(PreTrainedModel)) == before
    # contract drift: the class attribute is no longer a bool
    monkeypatch.setattr(PreTrainedModel, "_supports_flash_attn", "yes")
    with pytest.raises(RuntimeError, match=rf"_supports_flash_attn.*{transformers.__version__}"):
        A.patch_legacy_flash_attn_flag()


def test_backend_registration_protocol(monkeypatch):
    before = _registries()
    h = A.register_te_attention_backend()
    once = _registries()
    assert A.register_te_attention_backend() is h and _registries() == once
    assert once[0]["te"] is A.te_attention_forward
    A.unregister_te_attention_backend()
    assert _registries() == before
    A.register_te_attention_backend()
    mapping = modeling_utils.AttentionInterface._global_mapping
    mapping["te"] = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        A.unregister_te_attention_backend()
    mapping["te"] = A.te_attention_forward  # the foreign patch is undone first, then ours
    A.unregister_te_attention_backend()
    assert _registries() == before
    # contract drift: transformers' SDPA attention function lost its `scaling` parameter
    monkeypatch.setitem(
        modeling_utils.AttentionInterface._global_mapping,
        "sdpa",
        lambda module, query, key, value, attention_mask: 0,
    )
    with pytest.raises(RuntimeError, match=rf"scaling.*{transformers.__version__}"):
        A.register_te_attention_backend()
    assert not A.te_backend.is_te_attention_backend_registered()


def test_inject_protocol(monkeypatch):
    model = build("qwen2")
    snap = {n: dict(vars(m)) for n, m in model.named_modules()}
    cfg = dict(vars(model.config))
    h = A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    once = {n: dict(vars(m)) for n, m in model.named_modules()}
    assert A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention) is h
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == once
    h.revert()
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == snap
    assert dict(vars(model.config)) == cfg
    for name, m in model.named_modules():
        for key, value in snap[name].items():
            assert vars(m)[key] is value
    # foreign re-patch of the backend selection on top of ours
    h = A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    model.config._attn_implementation_internal = "eager"
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        A.remove_te_attention(model)
    model.config._attn_implementation_internal = "te"
    A.remove_te_attention(model)
    # contract drift: configs no longer keep the backend in `_attn_implementation_internal`
    monkeypatch.delattr(model.config, "_attn_implementation_internal")
    monkeypatch.setattr(type(model.config), "_attn_implementation", "sdpa", raising=False)
    with pytest.raises(RuntimeError, match=rf"_attn_implementation_internal.*{transformers.__version__}"):
        A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    assert "attn_module" not in vars(model.model.layers[0].self_attn)
    assert (
        not A.te_backend.is_te_attention_backend_registered() or A.unregister_te_attention_backend() is None
    )


@pytest.fixture
def writes(monkeypatch):
    """Every Patch write (attribute, registry entry, instance dict): drift tests assert there was none."""
    from am_attention._patch import ItemPatch, Patch
    from am_attention.te_inject import _InstanceDictPatch

    seen = []
    for cls in (Patch, ItemPatch, _InstanceDictPatch):
        original = vars(cls)["_set"]

        def spy(self, value, _original=original):
            seen.append(self.describe())
            return _original(self, value)

        monkeypatch.setattr(cls, "_set", spy)
    return seen


def _assert_nothing_injected(model, writes):
    assert writes == []
    assert not A.te_backend.is_te_attention_backend_registered()
    assert "te" not in modeling_utils.AttentionInterface._global_mapping
    assert all("attn_module" not in vars(m) for m in model.modules())
    assert vars(model.config)["_attn_implementation_internal"] != "te"


def test_mask_delegate_drift_raises(monkeypatch, writes):
    def sdpa_mask(batch_size, kv_length, mask_function=None, attention_mask=None, **kwargs):
        return None  # allow_is_causal_skip would vanish into **kwargs

    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, "sdpa", sdpa_mask)
    with pytest.raises(
        RuntimeError,
        match=rf"AttentionMaskInterface\['sdpa'\].*allow_is_causal_skip.*{transformers.__version__}",
    ):
        A.register_te_attention_backend()
    assert writes == [] and not A.te_backend.is_te_attention_backend_registered()


def _tiled_repeat_kv(hidden_states, n_rep):  # kv heads interleaved [0, 1, 0, 1, ...]: ::n_rep is wrong
    return hidden_states.repeat(1, n_rep, 1, 1)


def _extra_arg_repeat_kv(hidden_states, n_rep, dim):
    return hidden_states.repeat_interleave(n_rep, dim=dim)


@pytest.mark.parametrize(
    "repeat_kv, problem", [(_tiled_repeat_kv, "repeated contiguously"), (_extra_arg_repeat_kv, "signature")]
)
def test_repeat_kv_drift_raises(monkeypatch, writes, repeat_kv, problem):
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    model = build("qwen2")
    monkeypatch.setattr(qwen2, "repeat_kv", repeat_kv)
    with pytest.raises(
        RuntimeError, match=rf"modeling_qwen2\.repeat_kv.*{problem}.*{transformers.__version__}"
    ):
        A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    _assert_nothing_injected(model, writes)
    # the single-module entry point checks the same contract
    with pytest.raises(RuntimeError, match=r"repeat_kv"):
        A.inject_te_attention_into_module(
            model.model.layers[0].self_attn, dot_product_attention_cls=A.ReferenceDotProductAttention
        )
    _assert_nothing_injected(model, writes)


def _forward_without_kwargs(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    return interface(self, hidden_states, hidden_states, hidden_states, attention_mask, scaling=self.scaling)


def _forward_without_window(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    q = k = v = hidden_states
    return interface(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)


@pytest.mark.parametrize(
    "arch, forward, problem",
    [
        ("qwen2", _forward_without_kwargs, r"no longer passes \*\*kwargs"),
        ("mistral", _forward_without_window, "no longer passes sliding_window"),
    ],
)
def test_attention_forward_drift_raises(monkeypatch, writes, arch, forward, problem):
    model = build(arch)
    cls = type(model.model.layers[0].self_attn)
    monkeypatch.setattr(cls, "forward", forward)
    with pytest.raises(
        RuntimeError, match=rf"{cls.__name__}\.forward.*{problem}.*{transformers.__version__}"
    ):
        A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    _assert_nothing_injected(model, writes)


def test_config_backend_property_drift_raises(monkeypatch, writes):
    model = build("llama")
    # `_attn_implementation` no longer reads the stored field (e.g. a cached or derived value)
    drifted = type(
        "DriftedConfig", (type(model.config),), {"_attn_implementation": property(lambda self: "sdpa")}
    )
    monkeypatch.setattr(model.config, "__class__", drifted)
    with pytest.raises(
        RuntimeError,
        match=rf"_attn_implementation: does not read _attn_implementation_internal.*{transformers.__version__}",
    ):
        A.inject_te_attention(model, dot_product_attention_cls=A.ReferenceDotProductAttention)
    _assert_nothing_injected(model, writes)
