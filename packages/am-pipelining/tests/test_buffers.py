from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from am_pipelining import init_hf_model_buffers


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma4"])
def test_meta_model_matches_real_after_buffer_init(arch):
    if arch == "gemma4" and not tm.has_gemma4():
        pytest.skip("no gemma4 in this transformers")
    real = tm.build(arch)
    with torch.device("meta"):
        meta = type(real)(real.config)
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(real.state_dict())
    init_hf_model_buffers(meta, "cpu")
    assert not any(b.is_meta for b in meta.buffers())
    ids = torch.randint(20, tm.VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(meta.eval()(ids).logits, real(ids).logits, atol=1e-5, rtol=0)


def test_uninitialisable_meta_buffer_is_named():
    real = tm.build("llama")
    real.register_buffer("mystery", torch.empty(2, device="meta"), persistent=False)
    with pytest.raises(RuntimeError, match="mystery"):
        init_hf_model_buffers(real, "cpu")
