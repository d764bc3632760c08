"""`parameter_name` (the shared contract core, every copy): which spelling of a renamed parameter a function
takes, including transformers 5.25's `create_causal_mask(..., cache, ..., *, past_key_values=None)` alias."""

from __future__ import annotations

import importlib

import pytest

COPIES = ["am_attention", "am_kernels", "am_packing", "am_pipelining", "am_precision"]


def current(config, cache, position_ids=None, *, past_key_values=None): ...  # 5.25: cache + keyword alias


def renamed(config, cache, position_ids=None): ...


def old(config, past_key_values, position_ids=None): ...


def shim(config, cache, **kwargs): ...


def ambiguous(config, *, cache=None, past_key_values=None): ...


def both_positional(config, cache, past_key_values): ...


@pytest.mark.parametrize("package", COPIES)
def test_the_positional_spelling_is_the_parameter(package):
    contract = importlib.import_module(f"{package}._contract")
    assert contract.parameter_name(current, "past_key_values") == "cache"
    assert contract.parameter_name(renamed, "past_key_values") == "cache"
    assert contract.parameter_name(old, "past_key_values") == "past_key_values"
    assert contract.parameter_name(shim, "past_key_values") == "cache"
    for func in (ambiguous, both_positional):
        with pytest.raises(RuntimeError, match="expected exactly one of the parameters"):
            contract.parameter_name(func, "past_key_values")
