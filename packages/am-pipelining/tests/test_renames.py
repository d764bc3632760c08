"""Stage forwards follow the KV-cache parameter's name as each builder/layer declares it, or refuse.

The probes are copies of the installed mask builders and decoder layers whose cache parameter is
spelled another way: a known spelling of RENAMED_PARAMETERS (`past_key_values`, `cache`) must be
adapted to (and nothing else passed under another name), an unknown one (`kv_cache`) refused with a
RuntimeError naming the function and the installed transformers version, before anything runs.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import tiny_models as tm
import torch
import transformers.masking_utils as mu

from am_pipelining import split_model_into_stages
from am_pipelining._contract import RENAMED_PARAMETERS, parameter_name, transformers_version
from am_pipelining.introspect import get_decoder, owned_layers

SPELLINGS = RENAMED_PARAMETERS["past_key_values"]
BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


class Probe:
    """A copy of `fn` whose cache parameter is called `spelling`; records the keywords of every call."""

    def __init__(self, fn: Callable[..., Any], spelling: str, qualname: str) -> None:
        self.installed = parameter_name(fn, "past_key_values")
        self.spelling = spelling
        self.calls: list[set[str]] = []
        sig = inspect.signature(fn)
        params = [
            p.replace(name=spelling) if p.name == self.installed else p for p in sig.parameters.values()
        ]

        def probe(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(set(kwargs))
            if spelling in kwargs:
                kwargs[self.installed] = kwargs.pop(spelling)
            return fn(*args, **kwargs)

        probe.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        probe.__qualname__ = qualname
        probe.__module__ = __name__
        self.function = probe

    def assert_called_by_its_own_name(self) -> None:
        assert self.calls, f"{self.function.__qualname__} was never called"
        for keywords in self.calls:
            assert self.spelling in keywords, f"{self.function.__qualname__} got {sorted(keywords)}"
            others = keywords & (set(SPELLINGS) - {self.spelling})
            assert not others, f"{self.function.__qualname__} was passed the cache as {sorted(others)}"


def _probe_builders(monkeypatch: pytest.MonkeyPatch, spelling: str) -> list[Probe]:
    probes = [Probe(getattr(mu, name), spelling, name) for name in BUILDERS]
    for name, probe in zip(BUILDERS, probes):
        monkeypatch.setattr(mu, name, probe.function)
    return probes


def _probe_layers(model: torch.nn.Module, spelling: str) -> Probe:
    """Swap every decoder layer's class for a subclass whose forward spells the cache `spelling`."""
    layers = [layer for _, layer in owned_layers(get_decoder(model))]
    layer_cls = type(layers[0])
    probe = Probe(layer_cls.forward, spelling, "ProbeDecoderLayer.forward")
    probe_cls = type("ProbeDecoderLayer", (layer_cls,), {"forward": probe.function})
    for layer in layers:
        layer.__class__ = probe_cls
    return probe


def _ids() -> torch.Tensor:
    return torch.randint(20, tm.VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _chain(stages, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    x = ids
    for stage in stages:
        x = stage(x, **kwargs)
    return x


def _refusal(what: str) -> str:
    return rf"{re.escape(what)}.*kv_cache.*installed transformers {re.escape(transformers_version())}"


def _skip_if_builder_declares_two_spellings() -> None:
    """The rename probes rewrite the builder's one cache parameter; transformers 5.25 declares `cache` plus a
    keyword-only `past_key_values` alias, where renaming one would duplicate the other."""
    declared = [
        n
        for n in RENAMED_PARAMETERS["past_key_values"]
        if n in inspect.signature(mu.create_causal_mask).parameters
    ]
    if len(declared) > 1:
        pytest.skip(f"create_causal_mask declares {declared}")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_mask_builders_are_called_by_the_name_they_declare(monkeypatch, spelling):
    _skip_if_builder_declares_two_spellings()
    model = tm.build("gemma3")  # sliding and full layers: both builders run
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        probes = _probe_builders(monkeypatch, spelling)
        stages = split_model_into_stages(model, 2)
        # The split's own probe runs the unsplit forward, which spells its calls its own way.
        for probe in probes:
            probe.calls.clear()
        out = _chain(stages, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for probe in probes:
        probe.assert_called_by_its_own_name()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_decoder_layers_are_called_by_the_name_they_declare(spelling):
    model = tm.build("mistral")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        probe = _probe_layers(model, spelling)
        stages = split_model_into_stages(model, 2)
        # The split's own probe runs the unsplit forward, which spells its calls its own way.
        probe.calls.clear()
        out = _chain(stages, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    probe.assert_called_by_its_own_name()


def test_unknown_builder_spelling_is_refused_before_patching(monkeypatch):
    _skip_if_builder_declares_two_spellings()
    model = tm.build("llama")
    probes = _probe_builders(monkeypatch, "kv_cache")
    with pytest.raises(RuntimeError, match=_refusal("transformers.masking_utils.create_causal_mask")):
        split_model_into_stages(model, 2)
    assert not probes[0].calls


def test_builder_renamed_after_patching_is_refused_not_miscalled(monkeypatch):
    _skip_if_builder_declares_two_spellings()
    stages = split_model_into_stages(tm.build("llama"), 2)
    with torch.no_grad():
        hidden = stages[0](_ids())
        stages[1](hidden)  # fills stage 1's mask cache: the check must also run on a cache hit
        probes = _probe_builders(monkeypatch, "kv_cache")
        for stage, x in ((stages[0], _ids()), (stages[1], hidden)):
            with pytest.raises(RuntimeError, match=_refusal("create_causal_mask")):
                stage(x)
    assert not probes[0].calls


def test_unknown_layer_spelling_is_refused_before_patching():
    model = tm.build("llama")
    probe = _probe_layers(model, "kv_cache")
    with pytest.raises(RuntimeError, match=_refusal("ProbeDecoderLayer.forward")):
        split_model_into_stages(model, 2)
    assert not probe.calls


def test_layer_renamed_after_patching_is_refused_not_miscalled():
    stage = split_model_into_stages(tm.build("llama"), 2)[0]
    probe = _probe_layers(stage, "kv_cache")
    with torch.no_grad(), pytest.raises(RuntimeError, match=_refusal("ProbeDecoderLayer.forward")):
        stage(_ids())
    assert not probe.calls


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_stage_forwards_take_either_cache_spelling(spelling):
    model = tm.build("llama")
    ids = _ids()
    stages = split_model_into_stages(model, 2)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = _chain(stages, ids, **{spelling: None}, use_cache=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=rf"{spelling}=object; pass use_cache=False"):
        stages[0](ids, **{spelling: object()})


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2_vl", "mistral3", "gemma4_vlm"])
def test_no_cache_deprecation_warnings_from_stage_forwards(arch):
    if arch.startswith("gemma4") and not tm.has_gemma4():
        pytest.skip(f"transformers {transformers_version()} has no gemma4")
    stages = split_model_into_stages(tm.build(arch), 2)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        _chain(stages, _ids())
    about_cache = [str(w.message) for w in caught if any(f"`{s}`" in str(w.message) for s in SPELLINGS)]
    assert not about_cache, about_cache


def test_block_sequence_ids_are_refused_not_ignored():
    # An image-block overlay is neither document packing nor something the causal masks apply.
    stages = split_model_into_stages(tm.build("gemma3"), 2)
    blocks = torch.full((2, 12), -1)
    blocks[:, 2:6] = 0
    with pytest.raises(ValueError, match=r"block_sequence_ids.*position_ids"):
        stages[0](_ids(), block_sequence_ids=blocks)
    with torch.no_grad():
        stages[1](stages[0](_ids(), block_sequence_ids=None))


def _pass_through(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_causal_mask(*args: Any, **kwargs: Any) -> Any:  # another package's patch, say
        return original(*args, **kwargs)

    return create_causal_mask


def test_pass_through_hiding_the_builder_signature_is_refused(monkeypatch):
    monkeypatch.setattr(mu, "create_causal_mask", _pass_through(mu.create_causal_mask))
    with pytest.raises(
        RuntimeError, match=r"create_causal_mask.*hides.*__signature__.*installed transformers"
    ):
        split_model_into_stages(tm.build("llama"), 2)


def test_pass_through_exposing_the_builder_signature_is_adapted_to(monkeypatch):
    model = tm.build("llama")
    ids = _ids()
    original = mu.create_causal_mask
    wrapper = _pass_through(original)
    wrapper.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    monkeypatch.setattr(mu, "create_causal_mask", wrapper)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = _chain(split_model_into_stages(model, 2), ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
