from __future__ import annotations

import tiny_models as tm

from am_pipelining import MULTIMODAL_SUFFIXES, TEXT_MODULE_ATTRS, get_text_module, model_keeps_self_forward
from am_pipelining.introspect import is_gemma4_vlm, is_mistral3_vlm, is_vlm


def test_text_module_and_kinds():
    vlm = tm.build("mistral3")
    assert get_text_module(vlm.model) is vlm.model.language_model
    llama = tm.build("llama")
    assert get_text_module(llama) is llama
    assert is_vlm(vlm) and is_mistral3_vlm(vlm) and not is_gemma4_vlm(vlm) and not is_vlm(llama)
    assert TEXT_MODULE_ATTRS[0] == "language_model" and "vision_tower" in MULTIMODAL_SUFFIXES


def test_keeps_self_forward_opt_out():
    model = tm.build("llama")
    assert not model_keeps_self_forward(model)
    model._pp_keep_self_forward = True
    assert model_keeps_self_forward(model)
