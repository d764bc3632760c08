"""enable_packing: exact for the enabled model only, per-model undo, and no way for an unprepared model to
train on a packed batch."""

from __future__ import annotations

import threading

import pytest
import torch

import am_packing
from am_packing import (
    DocumentIdMask,
    PackingCollator,
    disable_packing,
    enable_packing,
    is_packing_enabled,
    pack_sequences,
    scoped,
    scoped_registry,
)

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]


def _run(model, batch, **extra):
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **extra,
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_enabled_model_packed_equals_per_document(make_model, exact, arch, impl):
    """Logits and gradients of a packed batch == each document alone (sliding windows included)."""
    model = make_model(arch, impl)
    docs = exact.documents()
    ref_logits, ref_grads = exact.per_document(model, docs)
    collate = PackingCollator(32)
    batch = collate(docs)
    with enable_packing(model) as handle:
        assert handle.applied and model.config._attn_implementation == f"am_packed_{impl}"
        logits, grads = exact.packed(
            model, batch, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
    assert model.config._attn_implementation == impl
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL
    exact.grads_close(ref_grads, grads)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_enabled_flex_attention_forward(make_model, exact, eager_flex, arch):
    model = make_model(arch, "flex_attention")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = pack_sequences(docs, 32)
    with enable_packing(model), torch.no_grad():
        logits = _run(model, batch).logits
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


def test_packing_without_position_ids_is_exact_too(make_model, exact):
    """RoPE only sees position differences, so the indexed mask alone separates the documents exactly."""
    model = make_model("llama", "sdpa")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = pack_sequences(docs, 32)
    with enable_packing(model), torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert exact.worst(docs, batch, logits, ref_logits) < 1e-4


def test_not_enabled_model_refuses_the_collators_mask(make_model):
    """Forgetting enable_packing raises instead of training documents into each other."""
    model = make_model("llama", "sdpa")
    batch = PackingCollator(32)([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    with pytest.raises(ValueError, match=r"DocumentIdMask.*enable_packing\(model\)"):
        _run(model, batch)
    # the control: the same ids as a plain tensor are silently read as a padding mask (what the marker prevents)
    plain = dict(batch, attention_mask=batch["attention_mask"].document_ids)
    _run(model, plain)


def test_other_models_are_unaffected(make_model, exact):
    """A second model (same class, same process) keeps its backend and refuses packed batches."""
    enabled, other = make_model("llama", "sdpa"), make_model("llama", "sdpa")
    docs = exact.documents()
    batch = PackingCollator(32)(docs)
    plain = other(input_ids=batch["input_ids"], use_cache=False).logits
    with enable_packing(enabled):
        assert other.config._attn_implementation == "sdpa" and not is_packing_enabled(other)
        torch.testing.assert_close(other(input_ids=batch["input_ids"], use_cache=False).logits, plain)
        with pytest.raises(ValueError, match="enable_packing"):
            _run(other, batch)
        _run(enabled, batch)


def test_shared_config_model_runs_the_plain_backend(make_model, exact):
    """Two models built on one config object: the one without the hook runs the plain backend exactly and
    still refuses the collator's mask."""
    from transformers import LlamaForCausalLM

    enabled = make_model("llama", "sdpa")
    torch.manual_seed(0)
    sharing = LlamaForCausalLM(enabled.config).eval()
    assert sharing.config is enabled.config
    batch = PackingCollator(32)(exact.documents())
    ids = batch["input_ids"]
    before = sharing(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    with enable_packing(enabled):
        assert sharing.config._attn_implementation == "am_packed_sdpa"  # the config object is shared
        after = sharing(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        torch.testing.assert_close(after, before, atol=0, rtol=0)
        with pytest.raises(ValueError, match="enable_packing"):
            _run(sharing, batch)


def test_enable_is_idempotent_and_undo_is_per_model(make_model):
    import transformers

    a, b = make_model("llama", "sdpa"), make_model("llama", "sdpa")
    registry = transformers.AttentionInterface._global_mapping
    ha = enable_packing(a)
    assert enable_packing(a) is ha and enable_packing(a, "sdpa") is ha
    hb = enable_packing(b)
    assert hb is not ha and "am_packed_sdpa" in registry
    ha.revert()
    assert not is_packing_enabled(a) and is_packing_enabled(b)
    assert a.config._attn_implementation == "sdpa" and "am_packed_sdpa" in registry  # b still uses it
    ha.revert()  # a second revert of the same handle changes nothing
    assert "am_packed_sdpa" in registry and is_packing_enabled(b)
    disable_packing(b)
    disable_packing(b)  # no-op
    assert "am_packed_sdpa" not in registry and b.config._attn_implementation == "sdpa"
    assert not a._forward_pre_hooks and not a._forward_hooks and not b._forward_pre_hooks


def test_undo_restores_the_config_entry_exactly(make_model):
    model = make_model("llama", "sdpa")
    before = dict(vars(model.config))
    enable_packing(model).revert()
    after = vars(model.config)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


def test_switching_backend_while_enabled_is_refused(make_model):
    model = make_model("llama", "sdpa")
    with enable_packing(model):
        with pytest.raises(ValueError, match="already enabled"):
            enable_packing(model, "eager")


def test_enable_can_switch_the_backend(make_model, exact):
    model = make_model("llama", "sdpa")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = pack_sequences(docs, 32)
    with enable_packing(model, "eager"), torch.no_grad():
        assert model.config._attn_implementation == "am_packed_eager"
        logits = _run(model, batch).logits
    assert model.config._attn_implementation == "sdpa"
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


@pytest.mark.parametrize(
    ("backend", "error", "words"),
    [
        ("flash_attention_2", ValueError, "position_ids"),
        ("torch_varlen", ValueError, "not one enable_packing packs"),
        (5, TypeError, "backend must be a str"),
    ],
)
def test_unsupported_backends_are_refused(make_model, backend, error, words):
    model = make_model("llama", "sdpa")
    with pytest.raises(error, match=words):
        enable_packing(model, backend)
    assert model.config._attn_implementation == "sdpa" and not is_packing_enabled(model)


@pytest.mark.parametrize("model", [None, 3, "llama", torch.nn.Linear(2, 2)])
def test_non_models_are_refused(model):
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        enable_packing(model)
    with pytest.raises(TypeError, match="model must be"):
        disable_packing(model)
    assert not is_packing_enabled(model)


def test_recurrent_layer_types_are_refused(make_model):
    model = make_model("llama", "sdpa")
    model.config.layer_types = ["full_attention", "linear_attention"]
    try:
        with pytest.raises(ValueError, match=r"cannot pack llama .*linear_attention"):
            enable_packing(model)
    finally:
        del model.config.layer_types
    assert model.config._attn_implementation == "sdpa"


def test_packed_call_with_a_cache_is_refused(make_model):
    from transformers import DynamicCache

    model = make_model("llama", "sdpa")
    batch = pack_sequences([[5, 6, 7], [8, 9]], 6)
    with enable_packing(model):
        with pytest.raises(ValueError, match="past_key_values was passed"):
            _run(model, batch, past_key_values=DynamicCache(config=model.config))
        with pytest.raises(ValueError, match="use_cache=True"):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=True)
        # left unset, use_cache is turned off for the packed call (the config default is True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out.past_key_values is None
        # and the model still decodes normally with a 0/1 mask
        out = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]))
        assert out.past_key_values is not None


def test_mask_shorter_than_the_input_is_refused(make_model):
    model = make_model("llama", "sdpa")
    batch = pack_sequences([[5, 6, 7], [8, 9]], 6)
    with (
        enable_packing(model),
        pytest.raises(ValueError, match=r"attention_mask of shape \(1, 5\).*\(1, 6\)"),
    ):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"][:, :5])


@pytest.mark.parametrize(
    ("mask", "error", "words"),
    [
        (torch.tensor([[1.0, 1.0, 2.0, 2.0, 2.0, 0.0]]), ValueError, "values other than 0 and 1"),
        (torch.tensor([[[1, 1, 2, 2, 2, 0]]]), ValueError, "must be a 2D"),
        (torch.tensor([[1, 1, 3, 3, 3, 0]]), ValueError, "row 0, position 2"),
    ],
)
def test_bad_masks_are_refused_by_the_enabled_model(make_model, mask, error, words):
    model = make_model("llama", "sdpa")
    with enable_packing(model), pytest.raises(error, match=words):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=mask, use_cache=False)


def test_a_model_that_bypasses_the_mask_builders_is_refused(make_model, monkeypatch):
    """Guard: if attention runs on a packed forward whose mask never went through the entry, it raises."""
    import transformers.models.llama.modeling_llama as llama

    model = make_model("llama", "sdpa")
    batch = pack_sequences([[5, 6, 7], [8, 9]], 6)
    monkeypatch.setattr(llama, "create_causal_mask", lambda *a, **k: None)  # a model with its own mask code
    with enable_packing(model), pytest.raises(ValueError, match="mask having been built"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_a_model_that_bypasses_the_attention_registry_is_refused(make_model, monkeypatch):
    """Guard: a packed forward that never dispatched attention through AttentionInterface raises after it."""
    model = make_model("llama", "sdpa")
    batch = pack_sequences([[5, 6, 7], [8, 9]], 6)
    for layer in model.model.layers:  # attention that ignores the config's implementation
        monkeypatch.setattr(layer.self_attn, "forward", lambda hidden_states, *a, **k: (hidden_states, None))
    with enable_packing(model), pytest.raises(ValueError, match="ran no attention through"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_positional_attention_mask_is_unwrapped(make_model, exact):
    model = make_model("llama", "sdpa")
    docs = exact.documents()[:3]
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = PackingCollator(64)(docs)
    with enable_packing(model), torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).logits
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


def test_documents_stay_in_their_thread(make_model, exact):
    """The ids live in a ContextVar: a plain forward in another thread during a packed one is unaffected."""
    model = make_model("llama", "sdpa")
    docs = exact.documents()
    batch = pack_sequences(docs, 32)
    ids = torch.tensor([docs[2]])
    expected = model(input_ids=ids, use_cache=False).logits
    seen = {}
    gate = threading.Event()
    original = scoped_registry._MASKS["sdpa"]

    def slow_mask(*args, **kwargs):  # the packed forward holds its ids while the other thread runs
        out = original(*args, **kwargs)
        if scoped_registry.CURRENT.get() is not None and not gate.is_set():
            thread = threading.Thread(
                target=lambda: seen.update(y=model(input_ids=ids, use_cache=False).logits)
            )
            thread.start()
            thread.join()
            gate.set()
        return out

    with enable_packing(model), torch.no_grad():
        import transformers.masking_utils as masking

        masking.AttentionMaskInterface._global_mapping["am_packed_sdpa"] = slow_mask
        try:
            _run(model, batch)
        finally:
            masking.AttentionMaskInterface._global_mapping["am_packed_sdpa"] = original
    torch.testing.assert_close(seen["y"], expected.detach(), atol=0, rtol=0)


def test_enabled_state_survives_no_strong_reference(make_model):
    """The registry keeps no strong reference to an enabled model (a dropped model is freed)."""
    import gc
    import weakref

    model = make_model("llama", "sdpa")
    enable_packing(model)
    ref = weakref.ref(model)
    handle = scoped._ENABLED[model]
    del model
    gc.collect()
    assert ref() is None
    handle.revert()  # the registry entries go with the last handle


def test_public_names():
    for name in ("enable_packing", "disable_packing", "is_packing_enabled", "DocumentIdMask"):
        assert name in am_packing.__all__
    assert "document_mask_function" not in am_packing.__all__
    assert isinstance(PackingCollator(8)([[1, 2]])["attention_mask"], DocumentIdMask)


def test_enable_packing_next_to_configure_packing(make_model, exact):
    """Both on at once: the process-wide pass-through leaves an enabled model's mask to its own entry."""
    from am_packing import configure_packing

    model = make_model("gemma3", "sdpa")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = PackingCollator(32)(docs)
    with configure_packing("sdpa"), enable_packing(model), torch.no_grad():
        logits = _run(model, batch).logits
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL
