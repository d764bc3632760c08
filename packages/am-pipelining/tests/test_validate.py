from __future__ import annotations

import pytest
import tiny_models as tm

from am_pipelining import get_pipeline_problems, validate_hf_model_for_pipeline_support


def test_untied_tiny_models_are_compatible():
    for arch in ("llama", "gemma3", "mistral3"):
        assert get_pipeline_problems(tm.build(arch), num_stages=2) == []
        validate_hf_model_for_pipeline_support(tm.build(arch))


def test_tied_embeddings_say_what_to_change():
    model = tm.build("llama", tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False on model\.config"):
        validate_hf_model_for_pipeline_support(model)


def test_vlm_tie_flag_on_top_level_config():
    model = tm.build("mistral3")
    model.config.tie_word_embeddings = True
    model.config.text_config.tie_word_embeddings = False
    problems = get_pipeline_problems(model)
    assert len(problems) == 1
    assert "top-level model.config (Mistral3Config)" in problems[0] and "text_config alone" in problems[0]


def test_too_many_stages_and_non_module():
    assert "exceeds the 4 decoder layers" in get_pipeline_problems(tm.build("llama"), num_stages=5)[0]
    assert get_pipeline_problems(object())[0].startswith("model must be a torch.nn.Module")
    with pytest.raises(TypeError):
        validate_hf_model_for_pipeline_support(object())


@pytest.mark.skipif(not tm.has_gemma4(), reason="no gemma4 in this transformers")
def test_gemma4_per_layer_inputs_block_multi_stage():
    model = tm.build("gemma4")
    model.config.hidden_size_per_layer_input = 8
    model.model.config.hidden_size_per_layer_input = 8
    assert any("hidden_size_per_layer_input=0" in p for p in get_pipeline_problems(model, num_stages=2))
