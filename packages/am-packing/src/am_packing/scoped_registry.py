"""The ``am_packed_<backend>`` entries `enable_packing` registers in transformers' attention registries.

``AttentionInterface["am_packed_<backend>"]`` runs the backend's own attention function (looked up per
call; for eager, the calling module's ``eager_attention_forward``). ``AttentionMaskInterface`` gets the
backend's own mask function with the document ids of the current packed forward (a ``ContextVar`` set by
`scoped`'s forward hook) AND-ed into its mask function through transformers' ``packed_sequence_mask_function``;
without ids it is exactly the backend's function. Both count what they do, so `scoped` can refuse a model
whose mask or attention bypassed them. The contracts (registries, mask-interface keywords, a packed probe
through the real builders) run before the first registry write.
"""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ._contract import contract_error, import_module_checked, require_callable, require_parameters
from ._originals import MASK_BUILDERS, SCOPED_PREFIX, unpatched_builder
from ._patch import GlobalPatch, ItemPatch, PatchSet, mark
from ._probes import PROBE_WINDOW, builder_what, probe_mask_interface_call, record_mask_interface_calls

__all__ = ["CURRENT", "REGISTRIES", "SCOPED_BACKENDS", "Packed", "scoped_name"]

SCOPED_BACKENDS: tuple[str, ...] = ("sdpa", "eager", "flex_attention")
# What the derived mask entry needs from the builders' calls of the mask interface.
_MASK_KEYWORDS = ("batch_size", "kv_length", "mask_function", "attention_mask")


def scoped_name(backend: str) -> str:
    return f"{SCOPED_PREFIX}{backend}"


@dataclass
class Packed:
    """The document ids of one packed forward, and what the guards count during it."""

    ids: torch.Tensor  # int64 [B, S], on the input's device
    model_type: str
    mask_builds: int = 0
    attention_calls: int = 0


CURRENT: contextvars.ContextVar[Packed | None] = contextvars.ContextVar("am_packing_documents", default=None)


# --------------------------------------------------------------------------- registry entries
def _base_attention(backend: str, module: Any) -> Any:
    if backend == "eager":  # transformers keeps each model's eager function in its modeling module
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"{type(module).__qualname__} ({type(module).__module__}) has no module-level "
                "eager_attention_forward, so am_packed_eager cannot run its eager attention"
            )
        return fn
    import transformers

    return transformers.AttentionInterface._global_mapping[backend]


def _make_attention(backend: str) -> Any:
    def attention(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any
    ):
        state = CURRENT.get()
        if state is not None:
            if state.mask_builds == 0:
                raise ValueError(
                    f"a packed forward of {state.model_type} reached attention without its mask having been built "
                    "by transformers' mask builders, so am-packing cannot separate the documents; this model is "
                    "not supported by enable_packing (try configure_packing)"
                )
            state.attention_calls += 1
        return _base_attention(backend, module)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = attention.__qualname__ = f"{scoped_name(backend)}_attention"
    return mark(attention, f"am_packing.{scoped_name(backend)}.attention")


def _query_length(kwargs: dict) -> int | None:
    if isinstance(kwargs.get("q_length"), int):
        return kwargs["q_length"]
    cache_position = kwargs.get("cache_position")  # transformers < 5.24 sizes the query by cache_position
    return int(cache_position.shape[0]) if isinstance(cache_position, torch.Tensor) else None


def _make_mask(backend: str) -> Any:
    def mask(*args: Any, **kwargs: Any) -> Any:
        masking = sys.modules["transformers.masking_utils"]
        base = masking.AttentionMaskInterface._global_mapping[backend]
        state = CURRENT.get()
        if state is None:
            return base(*args, **kwargs)
        batch, seq = state.ids.shape
        q_length, kv_length = _query_length(kwargs), kwargs.get("kv_length")
        offsets = [kwargs.get("kv_offset", 0), kwargs.get("q_offset", 0)]
        if (
            args
            or kwargs.get("batch_size") != batch
            or kv_length != seq
            or q_length != seq
            or any(isinstance(o, int) and o != 0 for o in offsets)
        ):
            raise ValueError(
                f"a packed forward of {state.model_type} built a mask for batch {kwargs.get('batch_size')}, "
                f"{q_length} queries and {kv_length} keys (offsets {offsets}), which does not match its indexed "
                f"packing mask of shape {(batch, seq)}; packing needs one document id per token and no KV cache"
            )
        kwargs["mask_function"] = masking.and_masks(
            kwargs["mask_function"], masking.packed_sequence_mask_function(state.ids)
        )
        # Padding (id 0) is a document of its own, so the padding mask is not needed (and would leave padding
        # queries with nothing to attend to); no skip to is_causal / full attention either.
        kwargs.update(attention_mask=None, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        state.mask_builds += 1
        return base(**kwargs)

    mask.__name__ = mask.__qualname__ = f"{scoped_name(backend)}_mask"
    return mark(mask, f"am_packing.{scoped_name(backend)}.mask")


_ATTENTION = {b: _make_attention(b) for b in SCOPED_BACKENDS}
_MASKS = {b: _make_mask(b) for b in SCOPED_BACKENDS}


# --------------------------------------------------------------------------- contracts
_PROBE_DOCUMENTS = (1, 1, 1, 1, 2, 2, 2)


def _registry_contract(backend: str) -> Any:
    def check(_live: Any) -> None:
        import transformers

        masking = import_module_checked("transformers.masking_utils")
        for owner, what in (
            (transformers.AttentionInterface, "transformers.AttentionInterface"),
            (masking.AttentionMaskInterface, "transformers.masking_utils.AttentionMaskInterface"),
        ):
            if not isinstance(getattr(owner, "_global_mapping", None), dict):
                raise contract_error(
                    what, f"has no dict _global_mapping registry to register {scoped_name(backend)} in"
                )
        for helper in ("and_masks", "packed_sequence_mask_function"):
            require_callable(getattr(masking, helper, None), f"transformers.masking_utils.{helper}")
        if backend != "eager":
            attention = transformers.AttentionInterface._global_mapping.get(backend)
            require_parameters(
                attention,
                ["module", "query", "key", "value", "attention_mask"],
                f"AttentionInterface[{backend!r}]",
            )
        base_mask = masking.AttentionMaskInterface._global_mapping.get(backend)
        require_parameters(
            base_mask, ["mask_function", "attention_mask"], f"AttentionMaskInterface[{backend!r}]"
        )
        for builder in MASK_BUILDERS:
            original = unpatched_builder(masking, builder)
            probe_mask_interface_call(masking, builder, original, _MASK_KEYWORDS)
            _probe_documents(masking, builder, original)

    return check


def _probe_documents(masking: Any, builder: str, original: Any) -> None:
    """The derived sdpa mask entry, called by the real builder on a packed probe, gives a block-diagonal mask."""
    ids = torch.tensor([_PROBE_DOCUMENTS])
    seq = ids.shape[1]
    q, kv = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    expected = (kv <= q) & (ids[0][:, None] == ids[0][None, :])
    if builder == "create_sliding_window_causal_mask":
        expected &= q - kv < PROBE_WINDOW
    token = CURRENT.set(Packed(ids, "probe"))
    try:
        _, result = record_mask_interface_calls(
            masking, builder, original, _MASKS["sdpa"], attention_mask=ids, seq=seq
        )
    finally:
        CURRENT.reset(token)
    ok = (
        isinstance(result, torch.Tensor)
        and result.dtype == torch.bool
        and result.shape[-2:] == (seq, seq)
        and bool(torch.equal(result.reshape(-1, seq, seq)[0], expected))
    )
    if not ok:
        raise contract_error(
            builder_what(builder),
            f"probe returned {result!r} for a packed mask through AttentionMaskInterface, expected the "
            f"block-diagonal causal bool mask {expected.int().tolist()}",
        )


def _registration(backend: str) -> PatchSet:
    import transformers

    masking = import_module_checked("transformers.masking_utils")
    name = scoped_name(backend)
    return PatchSet(
        [
            ItemPatch(
                transformers.AttentionInterface._global_mapping,
                name,
                _ATTENTION[backend],
                contract=_registry_contract(backend),
                label="AttentionInterface",
            ),
            ItemPatch(
                masking.AttentionMaskInterface._global_mapping,
                name,
                _MASKS[backend],
                label="AttentionMaskInterface",
            ),
        ],
        name=f"am_packing.enable_packing registry ({name!r})",
    )


REGISTRIES = {b: GlobalPatch(lambda b=b: _registration(b)) for b in SCOPED_BACKENDS}
