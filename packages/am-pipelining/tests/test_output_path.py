"""Final modules under any name, the causal LM's own head step, and the probe that refuses the rest.

Each family below is a tiny model from a config written here: 2 stages chained must equal the unsplit
model (fp32, same modules on the same inputs: only the mask's form can differ, so 1e-5). Families
whose decoder does something the stages cannot reproduce must be refused, naming the model type.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest
import torch
import transformers

from am_pipelining import get_pipeline_problems, get_stage_plan, split_model_into_stages
from am_pipelining.output_path import final_module_names

VOCAB = 96


def _build(model_type: str, **fields: Any) -> torch.nn.Module:
    # Older transformers of the nox matrix may not ship every family.
    pytest.importorskip(f"transformers.models.{model_type}", reason=f"this transformers has no {model_type}")
    base: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(fields)
    config = transformers.AutoConfig.for_model(model_type, **base)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norm weights: a final norm left out (or applied twice) must change the logits.
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.3)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _chained(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    x = ids
    for stage in split_model_into_stages(model, 2):
        x = stage(x)
    return x


EXACT = {
    # final_layernorm, with embed_dropout between embed_tokens and layers in base_model_pp_plan
    "phi": dict(model_type="phi", partial_rotary_factor=0.5),
    # final_layernorm without a base_model_pp_plan
    "persimmon": dict(model_type="persimmon", num_key_value_heads=4, partial_rotary_factor=0.5),
    # embedding_norm, registered after rotary_emb, applied after the last layer
    "lfm2": dict(
        model_type="lfm2",
        layer_types=["full_attention"] * 4,
        block_ff_dim=64,
        block_auto_adjust_ff_dim=False,
    ),
    # logits * logit_scale in the causal LM forward
    "cohere": dict(model_type="cohere", logit_scale=0.25),
    # hidden_states / (hidden_size / dim_model_base) before lm_head, embeddings scaled by scale_emb
    "minicpm3": dict(
        model_type="minicpm3",
        dim_model_base=8,
        scale_emb=3.0,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=4,
        v_head_dim=8,
    ),
    # logits / logits_scaling after lm_head; inputs_embeds * embedding_multiplier in the decoder forward
    "granite": dict(model_type="granite", logits_scaling=4.0, embedding_multiplier=2.0),
    # sinusoidal positions added to the scaled embeddings before the first layer, final layer_norm
    "xglm": dict(
        model_type="xglm", d_model=32, ffn_dim=64, num_layers=4, attention_heads=4, scale_embedding=True
    ),
}


@contextlib.contextmanager
def _refusal_skips():
    """An older minor whose layers take other arguments is refused (a RuntimeError naming the contract and
    the version) rather than split: that is the right outcome there, and nothing to compare."""
    try:
        yield
    except RuntimeError as exc:
        if "changed a private contract" not in str(exc):
            raise
        pytest.skip(f"refused on transformers {transformers.__version__}: {str(exc)[:200]}")


@pytest.mark.parametrize("name", sorted(EXACT))
def test_two_stages_equal_the_unsplit_model(name):
    model = _build(**EXACT[name])
    ids = _ids()
    with torch.no_grad(), _refusal_skips():
        ref = model(input_ids=ids, use_cache=False).logits
        got = _chained(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("name", "final"),
    [
        ("phi", "model.final_layernorm"),
        ("persimmon", "model.final_layernorm"),
        ("lfm2", "model.embedding_norm"),
        ("xglm", "model.layer_norm"),
    ],
)
def test_the_last_stage_owns_the_final_module(name, final):
    model = _build(**EXACT[name])
    first, last = get_stage_plan(model, 2)
    assert final in last and final not in first
    with _refusal_skips():
        stage0 = split_model_into_stages(model, 2, stage_index=0)
    assert getattr(stage0.model, final.rpartition(".")[2]) is None


def test_final_modules_skip_rotary_dropout_and_containers():
    phi = _build(**EXACT["phi"]).model
    assert final_module_names(phi) == ("final_layernorm",)
    lfm2 = _build(**EXACT["lfm2"]).model
    assert final_module_names(lfm2) == ("embedding_norm",)


REFUSED = {
    # one norm applied before the first layer and after the last: stage 0 and the last stage would share it
    "nanochat": (dict(model_type="nanochat"), "calls ['norm'] before its first layer and after its last"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_the_stages_cannot_reproduce_is_refused(name):
    fields, where = REFUSED[name]
    model = _build(**fields)
    problems = get_pipeline_problems(model, num_stages=2)
    assert len(problems) == 1 and f"model_type {name!r}" in problems[0] and where in problems[0]
    with pytest.raises(ValueError, match=re.escape(f"model_type {name!r}")):
        split_model_into_stages(model, 2)


def test_a_stage_path_that_fails_is_refused_not_crashed(monkeypatch):
    model = _build(model_type="llama")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("full_attention")

    monkeypatch.setattr("am_pipelining.forwards.run_decoder_layers", broken)
    with pytest.raises(ValueError, match=r"model_type 'llama'.*stage path fails.*KeyError"):
        split_model_into_stages(model, 2)


def test_a_dropped_final_module_is_caught_by_the_probe(monkeypatch):
    # A broken final-module rule (the old "only `norm`" one) must be refused, not run silently wrong.
    model = _build(**EXACT["phi"])
    monkeypatch.setattr("am_pipelining.run_layers.apply_final_modules", lambda decoder, hidden: hidden)
    problems = get_pipeline_problems(model)
    assert len(problems) == 1 and "model_type 'phi'" in problems[0] and "logit diff" in problems[0]


def test_the_probe_leaves_the_model_as_it_was():
    model = _build(model_type="llama").train()
    model.model.layers[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    assert get_pipeline_problems(model, num_stages=2) == []
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.model.layers[0]._forward_hooks and not model.model.layers[0]._forward_pre_hooks


def test_meta_models_skip_the_probe():
    config = _build(**EXACT["phi"]).config
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert get_pipeline_problems(model, num_stages=2) == []
