"""The patch protocol for every public patcher: configure_packing, register_varlen_attention, enable_packing."""

from __future__ import annotations

import sys

import pytest

import am_packing
from am_packing import (
    configure_packing,
    disable_packing,
    enable_packing,
    register_varlen_attention,
    unconfigure_packing,
    unregister_varlen_attention,
)


def _targets():
    import transformers
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as flash_utils
    import transformers.models.llama.modeling_llama as llama

    return {
        "masking": masking,
        "flash": flash_utils,
        "llama": llama,
        "attn": transformers.AttentionInterface._global_mapping,
        "mask_iface": masking.AttentionMaskInterface._global_mapping,
        "config": _model().config,
        "pre_hooks": _model()._forward_pre_hooks,
        "hooks": _model()._forward_hooks,
    }


_MODELS: dict = {}


def _model():
    """One tiny Llama for the enable_packing rows (built on first use)."""
    if not _MODELS:
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1,
        )  # fmt: skip
        _MODELS["llama"] = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return _MODELS["llama"]


def _state(targets):
    return {k: dict(vars(v)) if not isinstance(v, dict) else dict(v) for k, v in targets.items()}


def _assert_identical(before, after):
    for key in before:
        assert before[key].keys() == after[key].keys(), key
        for name, value in before[key].items():
            assert after[key][name] is value, f"{key}.{name} not restored"


PATCHERS = {
    "configure_packing": (lambda: configure_packing("sdpa"), unconfigure_packing),
    "register_varlen_attention": (register_varlen_attention, unregister_varlen_attention),
    "enable_packing": (lambda: enable_packing(_model()), lambda: disable_packing(_model())),
}


@pytest.mark.parametrize("name", PATCHERS)
def test_apply_twice_equals_once_and_revert_restores_identity(name):
    apply, undo = PATCHERS[name]
    targets = _targets()
    before = _state(targets)
    first = apply()
    once = _state(targets)
    second = apply()
    assert second is first
    _assert_identical(once, _state(targets))
    undo()
    _assert_identical(before, _state(targets))
    undo()  # undo without apply is a no-op
    _assert_identical(before, _state(targets))


@pytest.mark.parametrize("name", PATCHERS)
def test_handle_is_a_context_manager(name):
    apply, _ = PATCHERS[name]
    targets = _targets()
    before = _state(targets)
    with apply() as handle:
        assert handle.applied
    _assert_identical(before, _state(targets))


def test_revert_of_foreign_repatch_raises():
    import transformers.masking_utils as masking

    def foreign(*args, **kwargs):
        raise AssertionError("never called")

    configure_packing("sdpa")
    ours = masking.create_causal_mask
    masking.create_causal_mask = foreign
    try:
        with pytest.raises(RuntimeError, match="something else was patched over it"):
            unconfigure_packing()
    finally:
        masking.create_causal_mask = ours
        unconfigure_packing()


def test_revert_of_foreign_registry_entry_raises():
    mapping = _targets()["attn"]
    register_varlen_attention()
    ours = mapping["torch_varlen"]
    mapping["torch_varlen"] = lambda *a, **k: None
    try:
        with pytest.raises(RuntimeError, match="something else was patched over it"):
            unregister_varlen_attention()
    finally:
        mapping["torch_varlen"] = ours
        unregister_varlen_attention()


def test_contract_drift_of_mask_builder_raises(monkeypatch):
    import transformers
    import transformers.masking_utils as masking

    def create_causal_mask(config, inputs_embeds, attention_mask):  # lost and_mask_function
        return None

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    with pytest.raises(RuntimeError, match=r"masking_utils\.create_causal_mask.*and_mask_function") as err:
        configure_packing("sdpa")
    assert transformers.__version__ in str(err.value)
    assert am_packing.patches._CONFIGURED.active is None


def test_contract_drift_of_unpad_data_raises(monkeypatch):
    import transformers
    import transformers.modeling_flash_attention_utils as flash_utils

    monkeypatch.setattr(
        flash_utils, "_get_unpad_data", lambda attention_mask: (attention_mask, attention_mask)
    )
    with pytest.raises(RuntimeError, match="_get_unpad_data") as err:
        configure_packing("flash_attention_2")
    assert transformers.__version__ in str(err.value)
    # all-or-nothing: the mask builders patched before the failure were rolled back (checked by conftest)


def test_contract_drift_of_attention_registry_raises(monkeypatch):
    import transformers

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "sdpa", lambda x: x)
    with pytest.raises(RuntimeError, match=r"sdpa|query") as err:
        register_varlen_attention()
    assert transformers.__version__ in str(err.value)


def test_every_patched_object_is_marked():
    from am_packing._patch import patch_name

    with configure_packing("sdpa") as handle:
        for patch in handle:
            assert patch_name(
                patch.replacement,
            ).startswith("am_packing.")
    with register_varlen_attention() as handle:
        for patch in handle:
            assert patch_name(patch.replacement).startswith("am_packing.")
    import transformers

    with enable_packing(_model()):
        for name in ("am_packed_sdpa",):
            assert patch_name(transformers.AttentionInterface._global_mapping[name]).startswith("am_packing.")


def test_import_patches_nothing_and_needs_no_extra():
    """In a fresh interpreter: importing am_packing imports neither transformers nor an extra, touches no
    CUDA, and leaves transformers' mask builders, unpad function and registries as transformers made them."""
    import subprocess

    code = (
        "import sys; import am_packing; "
        "assert 'transformers' not in sys.modules, 'import pulled transformers'; "
        "assert 'flash_attn' not in sys.modules, 'import pulled flash_attn'; "
        "import torch; assert not torch.cuda.is_initialized(), 'import touched CUDA'; "
        "import transformers, transformers.masking_utils as m, transformers.modeling_flash_attention_utils as f; "
        "from am_packing._patch import patch_name; "
        "objs = [m.create_causal_mask, m.create_sliding_window_causal_mask, f._get_unpad_data, "
        "*transformers.AttentionInterface._global_mapping.values(), *m.AttentionMaskInterface._global_mapping.values()]; "
        "assert not [o for o in objs if patch_name(o)], 'import patched transformers'; "
        "print('import-clean')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "import-clean"


def _builder_state():
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as flash_utils

    return [vars(masking)[b] for b in ("create_causal_mask", "create_sliding_window_causal_mask")] + [
        vars(flash_utils)["_get_unpad_data"]
    ]


def test_contract_drift_attention_mask_not_third_positional_raises(monkeypatch, no_setattr):
    import transformers
    import transformers.masking_utils as masking

    def create_sliding_window_causal_mask(  # attention_mask moved: args[2] would read inputs_embeds... wrongly
        config, attention_mask, inputs_embeds, past_key_values=None, and_mask_function=None
    ):
        return None

    monkeypatch.setattr(masking, "create_sliding_window_causal_mask", create_sliding_window_causal_mask)
    before = _builder_state()
    with pytest.raises(
        RuntimeError, match=r"create_sliding_window_causal_mask.*attention_mask as the third positional"
    ) as err:
        configure_packing("sdpa")
    assert transformers.__version__ in str(err.value)
    assert no_setattr == [] and _builder_state() == before
    assert am_packing.patches._CONFIGURED.active is None


def test_contract_drift_and_mask_function_ignored_raises(monkeypatch, no_setattr, builder_copy):
    import transformers
    import transformers.masking_utils as masking

    # same parameters, but and_mask_function is silently ignored
    dropped = builder_copy(masking.create_causal_mask, ignore=("and_mask_function",))
    monkeypatch.setattr(masking, "create_causal_mask", dropped)
    before = _builder_state()
    with pytest.raises(
        RuntimeError, match=r"(?s)masking_utils\.create_causal_mask.*block-diagonal causal"
    ) as err:
        configure_packing("eager")
    assert transformers.__version__ in str(err.value)
    assert no_setattr == [] and _builder_state() == before
    assert am_packing.patches._CONFIGURED.active is None


def test_document_mask_probe_passes_on_installed_transformers():
    import transformers.masking_utils as masking

    from am_packing.patches import _probe_document_mask

    for builder in ("create_causal_mask", "create_sliding_window_causal_mask"):
        _probe_document_mask(builder, getattr(masking, builder))  # raises on a wrong mask


def test_contract_drift_sdpa_mask_keywords_raises(monkeypatch, no_setattr):
    import transformers
    import transformers.masking_utils as masking

    def sdpa_mask(batch_size, kv_length, /, mask_function=None, attention_mask=None):  # kv_length positional
        return None

    monkeypatch.setitem(masking.AttentionMaskInterface._global_mapping, "sdpa", sdpa_mask)
    with pytest.raises(RuntimeError, match=r"AttentionMaskInterface\['sdpa'\].*kv_length") as err:
        register_varlen_attention()
    assert transformers.__version__ in str(err.value)
    assert no_setattr == [] and "torch_varlen" not in masking.AttentionMaskInterface._global_mapping

    def sdpa_mask_no_kwargs(batch_size, kv_length, mask_function=None):  # attention_mask gone, no **kwargs
        return None

    monkeypatch.setitem(masking.AttentionMaskInterface._global_mapping, "sdpa", sdpa_mask_no_kwargs)
    with pytest.raises(RuntimeError, match=r"AttentionMaskInterface\['sdpa'\].*attention_mask"):
        register_varlen_attention()
    assert no_setattr == []


def test_varlen_contract_reads_originals_while_packing_is_configured():
    with configure_packing("sdpa"), register_varlen_attention() as handle:
        assert handle.applied


# --------------------------------------------------------------------------- register_varlen_attention names
@pytest.mark.parametrize(
    ("name", "error", "words"),
    [
        (None, TypeError, "name must be a str"),
        (5, TypeError, "name must be a str"),
        ("", ValueError, "non-empty"),
        (" torch_varlen", ValueError, "surrounding spaces"),
        ("sdpa", ValueError, "already registered in transformers' AttentionInterface"),
        ("flex_attention", ValueError, "already registered"),
        ("my_flash", ValueError, "containing 'flash'"),
        ("paged|varlen", ValueError, "paged"),
    ],
)
def test_register_varlen_refuses_bad_names(name, error, words):
    """Refused: non-string and empty names, and names transformers already uses ('sdpa' used to be
    overwritten for every model)."""
    import transformers

    before = dict(transformers.AttentionInterface._global_mapping)
    with pytest.raises(error, match=words):
        register_varlen_attention(name)
    after = transformers.AttentionInterface._global_mapping
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


def test_register_varlen_under_a_second_name_is_refused():
    """A second call with another name used to return the first handle silently."""
    with register_varlen_attention("torch_varlen") as handle:
        assert register_varlen_attention("torch_varlen") is handle
        with pytest.raises(ValueError, match="already registered as 'torch_varlen'"):
            register_varlen_attention("varlen2")
    with register_varlen_attention("varlen2") as handle:
        assert handle.applied
        import transformers

        assert "varlen2" in transformers.AttentionInterface._global_mapping


def test_enable_packing_contract_drift_raises(monkeypatch, no_setattr):
    """enable_packing's probes (mask-interface keywords, the packed probe) run before any registry write."""
    import transformers
    import transformers.masking_utils as masking

    def create_causal_mask(config, inputs_embeds, attention_mask, cache=None, and_mask_function=None):
        iface = masking.ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
        return iface(batch_size=1, kv_length=4, attention_mask=attention_mask)  # no mask_function keyword

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    model = _model()
    with pytest.raises(RuntimeError, match=r"create_causal_mask.*mask_function") as err:
        enable_packing(model)
    assert transformers.__version__ in str(err.value)
    assert no_setattr == [] and model.config._attn_implementation == "sdpa"
    assert "am_packed_sdpa" not in transformers.AttentionInterface._global_mapping


def test_enable_packing_probe_catches_a_builder_that_drops_its_window(monkeypatch, no_setattr):
    """A builder that calls the interface with the right keywords but a wrong mask function (here: its
    sliding window lost) is refused by the packed behaviour probe before any registry write."""
    import transformers.masking_utils as masking

    real = masking.create_sliding_window_causal_mask

    def drops_mask_function(*args, **kwargs):
        iface_name = kwargs["config"]._attn_implementation
        original = masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[iface_name]

        def forgetful(*a, **k):
            k["mask_function"] = masking.causal_mask_function  # transformers dropping the composed function
            return original(*a, **k)

        masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[iface_name] = forgetful
        try:
            return real(*args, **kwargs)
        finally:
            masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[iface_name] = original

    drops_mask_function.__signature__ = __import__("inspect").signature(real)
    monkeypatch.setattr(masking, "create_sliding_window_causal_mask", drops_mask_function)
    with pytest.raises(RuntimeError, match=r"(?s)create_sliding_window_causal_mask.*block-diagonal"):
        enable_packing(_model())
    assert no_setattr == []
