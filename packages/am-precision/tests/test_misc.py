"""lm_head.py, rope.py, microbatch.py, availability.py."""

import importlib.util
import sys

import pytest
import torch

import am_precision
from am_precision import compute_lm_head_logits, get_rope_config


@pytest.fixture
def head():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 16, bias=False)


def test_lm_head_full_and_kept_positions(head):
    h = torch.randn(2, 5, 8)
    full = compute_lm_head_logits(head, h)
    assert full.logits.shape == (2, 5, 16) and full.hidden_states is None
    torch.testing.assert_close(full.logits, h @ head.weight.T)
    last2 = compute_lm_head_logits(head, h, logits_to_keep=2)
    torch.testing.assert_close(last2.logits, full.logits[:, -2:])
    idx = torch.tensor([0, 3])
    torch.testing.assert_close(
        compute_lm_head_logits(head, h, logits_to_keep=idx).logits, full.logits[:, idx]
    )


def test_lm_head_thd_and_passthrough(head):
    t = torch.randn(7, 8)
    out = compute_lm_head_logits(head, t, logits_to_keep=3, is_thd=True, output_hidden_states=True)
    assert out.logits.shape == (1, 3, 16) and out.hidden_states.shape == (1, 7, 8)
    torch.testing.assert_close(out.logits[0], t[-3:] @ head.weight.T)
    same = compute_lm_head_logits(None, t, is_thd=True)
    assert same.logits.shape == (1, 7, 8) and torch.equal(same.logits[0], t)
    with pytest.raises(ValueError, match=">= 0"):
        compute_lm_head_logits(head, t, logits_to_keep=-1)


def test_lm_head_fp32(head):
    h = torch.randn(1, 4, 8).to(torch.bfloat16)
    out = compute_lm_head_logits(head, h, fp32_lm_head=True)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, (h.float() @ head.weight.T).to(torch.bfloat16))


def test_rope_config():
    from transformers import Gemma3TextConfig, LlamaConfig, StableLmConfig

    theta, params, factor = get_rope_config(
        LlamaConfig(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})
    )
    assert theta == 5e5 and params["rope_type"] == "default" and factor == 1.0
    assert get_rope_config(StableLmConfig())[2] == 0.25
    gemma = Gemma3TextConfig()
    with pytest.raises(ValueError, match="full_attention"):
        get_rope_config(gemma)
    assert get_rope_config(gemma, layer_type="full_attention")[0] == 1e6
    with pytest.raises(ValueError, match="expected one of"):
        get_rope_config(gemma, layer_type="chunked")


def test_flags():
    assert am_precision.get_is_first_microbatch() is None and am_precision.get_is_optim_step() is False
    am_precision.set_is_first_microbatch(True)
    am_precision.set_is_optim_step(True)
    assert am_precision.get_is_first_microbatch() is True and am_precision.get_is_optim_step() is True
    am_precision.set_is_first_microbatch(None)
    am_precision.set_is_optim_step(False)
    with pytest.raises(TypeError):
        am_precision.set_is_first_microbatch(1)
    with pytest.raises(TypeError):
        am_precision.set_is_optim_step(None)


def test_availability_flags_and_import_hygiene():
    assert am_precision.HAVE_TE == (importlib.util.find_spec("transformer_engine") is not None)
    assert am_precision.HAVE_GMM == (importlib.util.find_spec("grouped_gemm") is not None)
    assert am_precision.HAVE_DEEP_EP == (importlib.util.find_spec("deep_ep") is not None)
    assert isinstance(am_precision.HAVE_UCCL_EP, bool)
    assert not any(
        m.startswith(("transformer_engine", "grouped_gemm", "deep_ep", "uccl")) for m in sys.modules
    )
