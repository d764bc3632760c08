"""Drift of transformers' private mask-builder contracts: adapted to by signature/behaviour, or refused.

Stand-in builders (`builder_copy` in conftest) forward to the installed ones under a drifted signature, so
each test runs on every supported transformers version: renamed parameters (5.24's ``cache``, a future
``kv_cache``), a moved ``attention_mask``, a builder that calls the mask interface differently, and 5.23+'s
``block_sequence_ids`` overlay next to packed documents.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import am_packing
from am_packing import configure_packing, register_varlen_attention
from am_packing._contract import RENAMED_PARAMETERS, parameter_name
from am_packing.patches import _blocks_within_documents

BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")
DOCUMENTS = [[1, 1, 1, 1, 2, 2, 2, 3, 3]]
WINDOW = 3


def _masking():
    import transformers.masking_utils as masking

    return masking


def _config(attn_implementation: str = "sdpa"):
    import transformers

    config = transformers.PretrainedConfig()
    config._attn_implementation = attn_implementation
    config.sliding_window = WINDOW
    return config


def _call(builder_fn, seq: int, *, cache_name: str, cache=None, declared=None, **kwargs):
    """Call a builder the way 5.24's modeling code does (keywords only), with the parameters `declared`
    (a transformers builder or stand-in; default `builder_fn`) requires."""
    kwargs = dict(config=_config(), inputs_embeds=torch.zeros(1, seq, 1), **{cache_name: cache}, **kwargs)
    if "cache_position" in inspect.signature(declared or builder_fn).parameters:  # required on 5.3
        kwargs["cache_position"] = torch.arange(seq)
    return builder_fn(**kwargs)


def _per_document(builder: str, ids: torch.Tensor) -> torch.Tensor:
    """[S, S] bool: causal (sliding) attention inside each document, nothing across."""
    seq = ids.shape[-1]
    q, kv = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    allowed = (kv <= q) & (ids[0][:, None] == ids[0][None, :])
    if builder == "create_sliding_window_causal_mask":
        allowed &= q - kv < WINDOW
    return allowed


class _NonEmptyCache:
    def get_seq_length(self) -> int:
        return 3


def _assert_refused(err, builder: str, *patterns: str) -> None:
    import transformers

    message = str(err.value)
    assert f"transformers.masking_utils.{builder}" in message and transformers.__version__ in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


# --------------------------------------------------------------------------- renamed cache parameter
@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("spelling", ["past_key_values", "cache", "kv_cache"])
def test_every_cache_spelling_in_the_table_is_adapted_to(monkeypatch, builder_copy, builder, spelling):
    """A builder declaring any spelling of RENAMED_PARAMETERS is probed, patched and called under it.

    `kv_cache` stands for the next rename: one row added to the table is all it takes. The copies declare
    no **kwargs, so passing another spelling anywhere raises TypeError.
    """
    masking = _masking()
    real = getattr(masking, builder)
    declared = [s for s in RENAMED_PARAMETERS["past_key_values"] if s in inspect.signature(real).parameters]
    if len(declared) > 1:  # transformers 5.25: `cache` plus a keyword-only `past_key_values` alias
        pytest.skip(f"{builder} declares {declared}: renaming one spelling would duplicate the other")
    copy = builder_copy(real, rename={parameter_name(real, "past_key_values"): spelling})
    spellings = RENAMED_PARAMETERS["past_key_values"]
    if spelling not in spellings:
        monkeypatch.setitem(RENAMED_PARAMETERS, "past_key_values", (*spellings, spelling))
    monkeypatch.setattr(masking, builder, copy)
    ids = torch.tensor(DOCUMENTS)
    with configure_packing("sdpa"), register_varlen_attention():
        ours = getattr(masking, builder)
        assert ours is getattr(am_packing.patches, builder)
        mask = _call(ours, ids.shape[1], cache_name=spelling, declared=copy, attention_mask=ids)
        assert torch.equal(mask[0, 0], _per_document(builder, ids))
        # the cache is read under the builder's spelling: packing refuses a non-empty one
        with pytest.raises(ValueError, match="non-empty KV cache"):
            _call(
                ours,
                ids.shape[1],
                cache_name=spelling,
                declared=copy,
                cache=_NonEmptyCache(),
                attention_mask=ids,
            )


@pytest.mark.parametrize("builder", BUILDERS)
def test_unknown_cache_spelling_is_refused(monkeypatch, builder_copy, no_setattr, builder):
    """A rename not in the table (`kv_cache`) is refused, naming the function and version."""
    masking = _masking()
    real = getattr(masking, builder)
    declared = [s for s in RENAMED_PARAMETERS["past_key_values"] if s in inspect.signature(real).parameters]
    if len(declared) > 1:  # transformers 5.25: `cache` plus a keyword-only `past_key_values` alias
        pytest.skip(f"{builder} declares {declared}: renaming one spelling would duplicate the other")
    monkeypatch.setattr(
        masking, builder, builder_copy(real, rename={parameter_name(real, "past_key_values"): "kv_cache"})
    )
    for apply in (lambda: configure_packing("sdpa"), register_varlen_attention):
        with pytest.raises(RuntimeError) as err:
            apply()
        _assert_refused(err, builder, "expected exactly one of the parameters", "kv_cache")
    assert no_setattr == []
    assert am_packing.patches._CONFIGURED.active is None and am_packing.backends._VARLEN.active is None


@pytest.mark.parametrize("builder", BUILDERS)
def test_moved_attention_mask_is_refused(monkeypatch, builder_copy, no_setattr, builder):
    """attention_mask moved from third to second place: the pass-through would read the wrong argument."""
    masking = _masking()
    monkeypatch.setattr(masking, builder, builder_copy(getattr(masking, builder), move=("attention_mask", 1)))
    with pytest.raises(RuntimeError) as err:
        configure_packing("sdpa")
    _assert_refused(err, builder, "attention_mask as the third positional")
    assert no_setattr == [] and am_packing.patches._CONFIGURED.active is None


def test_no_deprecated_name_reaches_the_installed_transformers(make_model):
    """Our probes and pass-throughs only use the spellings the installed functions declare."""
    model = make_model("mistral", "sdpa")
    batch = am_packing.pack_sequences([[5, 6, 7, 8, 9], [10, 11, 12]], 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with configure_packing("sdpa"), register_varlen_attention(), torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            model(
                input_ids=batch["input_ids"],
                attention_mask=torch.ones_like(batch["input_ids"]),
                use_cache=False,
            )


# --------------------------------------------------------------------------- mask-interface behaviour probe
def _positional_everything(iface, attention_mask):
    return iface(1, 4, 4, 0, 0, None, attention_mask)


def _positional_kv_length(iface, attention_mask):
    return iface(1, 4, 4, attention_mask=attention_mask)


@pytest.mark.parametrize("call", [_positional_everything, _positional_kv_length])
def test_mask_interface_probe_refuses_positional_calls(monkeypatch, no_setattr, call):
    """A builder that hands attention_mask or kv_length to the mask interface positionally is refused."""
    masking = _masking()
    registry = masking.AttentionMaskInterface._global_mapping
    before = dict(registry)
    seen = []

    def create_causal_mask(config, inputs_embeds, attention_mask, cache=None, and_mask_function=None):
        seen.append(config._attn_implementation)
        assert config._attn_implementation in registry  # the probe's recorder is registered during the call
        return call(masking.ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation], attention_mask)

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    with pytest.raises(RuntimeError) as err:
        register_varlen_attention()
    _assert_refused(err, "create_causal_mask", re.escape("keywords ['attention_mask', 'kv_length']"))
    assert no_setattr == [] and am_packing.backends._VARLEN.active is None
    assert seen and seen[0] not in before and seen[0] not in registry and registry == before


def test_mask_interface_probe_refuses_a_builder_that_never_calls_it(monkeypatch, no_setattr):
    masking = _masking()

    def create_sliding_window_causal_mask(config, inputs_embeds, attention_mask, past_key_values=None):
        return None

    monkeypatch.setattr(masking, "create_sliding_window_causal_mask", create_sliding_window_causal_mask)
    with pytest.raises(RuntimeError) as err:
        register_varlen_attention()
    _assert_refused(err, "create_sliding_window_causal_mask", "never reached the AttentionMaskInterface")
    assert no_setattr == []


def test_mask_interface_probe_restores_the_registry_when_the_builder_raises(monkeypatch):
    masking = _masking()
    registry = masking.AttentionMaskInterface._global_mapping
    before = dict(registry)

    def create_causal_mask(config, inputs_embeds, attention_mask, cache=None):
        raise KeyError("boom")

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    with pytest.raises(RuntimeError) as err:
        register_varlen_attention()
    _assert_refused(err, "create_causal_mask", "probe call failed")
    assert registry == before and all(registry[k] is v for k, v in before.items())


# --------------------------------------------------------------------------- block_sequence_ids
def _block_builders():
    masking = _masking()
    return [b for b in BUILDERS if "block_sequence_ids" in inspect.signature(getattr(masking, b)).parameters]


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize(
    "blocks",
    [
        [[0, 0, -1, -1, 0, 0, -1, 0, 0]],  # paligemma: one prefix group for the whole row
        [[-1, -1, 0, 0, 0, 0, -1, -1, -1]],  # gemma3: an image ending document 1 merges with one starting 2
    ],
)
def test_block_overlay_stays_inside_each_document(builder, blocks):
    """Packed mask with block_sequence_ids == each document alone with its own slice of them."""
    masking = _masking()
    original = getattr(masking, builder)
    if builder not in _block_builders():
        pytest.skip(f"{builder} of this transformers version takes no block_sequence_ids")
    cache_name = parameter_name(original, "past_key_values")
    ids, blocks = torch.tensor(DOCUMENTS), torch.tensor(blocks)
    expected = torch.zeros(ids.shape[1], ids.shape[1], dtype=torch.bool)
    for doc in ids.unique().tolist():
        sel = (ids[0] == doc).nonzero().flatten()
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        alone = _call(
            original,
            hi - lo,
            cache_name=cache_name,
            attention_mask=None,
            block_sequence_ids=blocks[:, lo:hi],
            allow_is_causal_skip=False,
        )
        expected[lo:hi, lo:hi] = alone[0, 0]
    with configure_packing("sdpa"):
        packed = _call(
            getattr(masking, builder),
            ids.shape[1],
            cache_name=cache_name,
            declared=original,
            attention_mask=ids,
            block_sequence_ids=blocks,
        )
    assert torch.equal(packed[0, 0], expected)
    assert not torch.equal(expected, _per_document(builder, ids))  # the blocks did open attention


def test_blocks_within_documents_keeps_blocks_and_splits_at_boundaries():
    ids = torch.tensor([[1, 1, 2, 2, 0]])
    blocks = torch.tensor([[0, 0, 0, -1, 0]])
    split = _blocks_within_documents(blocks, ids)
    same = split[0][:, None] == split[0][None, :]
    assert same[0, 1] and not same[1, 2] and not same[2, 4] and split[0, 3] < 0
    with pytest.raises(ValueError, match="block_sequence_ids of shape"):
        _blocks_within_documents(torch.zeros(1, 3, dtype=torch.long), ids)


# --------------------------------------------------------------------------- policy
def test_no_bytecode_reads_in_am_packing():
    """Contracts are checked by signature and behaviour, never by reading CPython code objects."""
    src = Path(am_packing.__file__).parent
    # spelled with character classes so that grepping am-packing for these names finds no hit here either
    banned = re.compile(
        r"__cod[e]__|\bco_(const|name|varname)s\b|\bco_cod[e]\b|\b(import|from) di[s]\b|\bdi[s]\."
    )
    hits = [
        f"{p.name}:{n}"
        for p in src.glob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if banned.search(line)
    ]
    assert not hits
