"""A patched model copies, pickles and frees like any other: copies compute with their own weights."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import tiny_models as tm
import torch

from am_pipelining import (
    patch_hf_model_for_pp,
    pp_mask_cache,
    split_model_into_stages,
    unpatch_hf_model_for_pp,
)

ARCHS = ["llama", "gemma3", "mistral3", "qwen2_vl", "gemma4_vlm"]


def _ids() -> torch.Tensor:
    return torch.randint(20, tm.VOCAB - 8, (2, 12), generator=torch.Generator().manual_seed(4))


def _skip_missing(arch: str) -> None:
    if arch.startswith("gemma4") and not tm.has_gemma4():
        pytest.skip("no gemma4 in this transformers")


def _halve(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


def _via_pickle(model: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(model))


def _via_torch_save(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _via_pickle, "torch.save": _via_torch_save}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("arch", ARCHS)
def test_copy_of_patched_model_computes_with_its_own_weights(arch, how):
    _skip_missing(arch)
    model = tm.build(arch)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    patch_hf_model_for_pp(model)
    clone = COPIES[how](model)
    with torch.no_grad():
        torch.testing.assert_close(clone(ids), reference, atol=1e-5, rtol=0)  # patched, same numbers
        _halve(clone)
        halved = clone(ids)
        original = model(ids)
    torch.testing.assert_close(original, reference, atol=1e-5, rtol=0)
    assert (halved - original).abs().max() > 1e-3, "the copy ran the original model's weights"
    plain = COPIES[how](tm.build(arch))  # the same halving on an unpatched copy gives the same numbers
    _halve(plain)
    with torch.no_grad():
        torch.testing.assert_close(halved, plain(input_ids=ids, use_cache=False).logits, atol=1e-5, rtol=0)
    # the copy carries its own handle: undoing it restores the copy and leaves the original patched
    unpatch_hf_model_for_pp(clone)
    assert "forward" not in vars(clone) and "forward" in vars(model)
    unpatch_hf_model_for_pp(model)
    assert "forward" not in vars(model)


def test_copied_mask_cache_is_the_copys_own():
    model = tm.build("llama")
    patch_hf_model_for_pp(model)
    with torch.no_grad():
        model(_ids())
    clone = copy.deepcopy(model)
    assert pp_mask_cache(clone) is not pp_mask_cache(model)
    assert pp_mask_cache(model).builds == 1 and pp_mask_cache(clone).builds == 0
    unpatch_hf_model_for_pp(model)


@pytest.mark.parametrize("how", list(COPIES))
def test_stages_pickle_and_copy(how):
    model = tm.build("llama")
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        stages = [COPIES[how](s) for s in split_model_into_stages(model, 2)]
        torch.testing.assert_close(stages[1](stages[0](ids)), reference, atol=1e-5, rtol=0)


def test_patched_model_dropped_without_undo_is_freed():
    model = tm.build("llama")
    patch_hf_model_for_pp(model)
    alive = weakref.ref(model)
    stages = split_model_into_stages(tm.build("llama"), 2)
    stage_alive = [weakref.ref(s) for s in stages]
    del model, stages
    gc.collect()
    assert alive() is None, "a patched model is kept alive after the last user reference is gone"
    assert all(ref() is None for ref in stage_alive), "split stages are kept alive"


def test_patching_before_splitting_gives_stages_bound_to_their_own_modules():
    model = tm.build("llama")
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    handle = patch_hf_model_for_pp(model)
    stages = split_model_into_stages(model, 2)
    for stage in stages:
        forward = vars(stage.model)["forward"]
        assert forward.__self__ is stage.model and forward.handle is not handle
    with torch.no_grad():
        torch.testing.assert_close(stages[1](stages[0](ids)), reference, atol=1e-5, rtol=0)
    handle.revert()
