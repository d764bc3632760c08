"""patch_hf_model_for_pp follows the patch protocol."""

from __future__ import annotations

import pytest
import tiny_models as tm

from am_pipelining import patch_hf_model_for_pp, unpatch_hf_model_for_pp


def _forwards(model):
    return {name: dict(vars(m)) for name, m in model.named_modules() if name in ("", "model")}


def test_apply_twice_equals_once_and_revert_restores_vars():
    model = tm.build("llama")
    before = _forwards(model)
    handle = patch_hf_model_for_pp(model)
    patched = vars(model.model)["forward"]
    assert patched.__am_patch__ == "am_pipelining.pipeline_forward_inner"
    assert patch_hf_model_for_pp(model) is handle and vars(model.model)["forward"] is patched
    unpatch_hf_model_for_pp(model)
    after = _forwards(model)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].keys() == before[k].keys() and all(after[k][a] is before[k][a] for a in before[k])
    assert "forward" not in vars(model) and "forward" not in vars(model.model)


def test_handle_is_context_manager():
    model = tm.build("qwen3")
    with patch_hf_model_for_pp(model):
        assert "forward" in vars(model)
    assert "forward" not in vars(model)
    unpatch_hf_model_for_pp(model)


def test_revert_of_foreign_repatch_raises():
    model = tm.build("llama")
    handle = patch_hf_model_for_pp(model)
    ours = vars(model)["forward"]
    model.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        handle.revert()
    model.forward = ours
    handle.revert()
    assert "forward" not in vars(model)


def test_contract_drift_raises_naming_function_and_version(monkeypatch):
    import transformers
    import transformers.masking_utils as mu

    def create_causal_mask(config, inputs_embeds):  # drifted signature
        return None

    monkeypatch.setattr(mu, "create_causal_mask", create_causal_mask)
    model = tm.build("llama")
    with pytest.raises(RuntimeError, match=rf"create_causal_mask.*{transformers.__version__}"):
        patch_hf_model_for_pp(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.model)


def test_contracts_never_read_bytecode():
    # Contracts adapt by signature and behaviour; code objects change with every CPython release.
    import re
    from pathlib import Path

    import am_pipelining

    pattern = re.compile(r"__code__|\bco_(names|consts|varnames|code)\b|^\s*(import|from) dis\b", re.M)
    sources = sorted(Path(am_pipelining.__file__).parent.glob("*.py"))
    offenders = [p.name for p in sources if pattern.search(p.read_text())]
    assert sources and not offenders, offenders


def test_failed_unpatch_changes_nothing_and_can_be_retried():
    model = tm.build("llama")
    patch_hf_model_for_pp(model)
    ours, inner = vars(model)["forward"], vars(model.model)["forward"]
    model.forward = lambda *a, **k: None  # someone patched over ours
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        unpatch_hf_model_for_pp(model)
    assert vars(model.model)["forward"] is inner  # checked before anything was restored
    model.forward = ours
    unpatch_hf_model_for_pp(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.model)
