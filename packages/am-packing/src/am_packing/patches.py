"""`configure_packing` and its undo: make every transformers decoder honour indexed packing masks.

What is patched (all through `Patch`, reverted exactly by `unconfigure_packing`):

1. ``masking_utils.create_causal_mask`` and ``create_sliding_window_causal_mask``: so any modeling module
   imported *after* `configure_packing` binds our pass-through at its ``from ...masking_utils import``.
2. The same names in every already-imported ``transformers.models.*`` module holding the original
   (discovered by identity in ``sys.modules``; `discovery.find_causal_mask_modules` lists the candidates
   from source without importing them).
3. The entries of ``masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING`` holding a builder (through which
   ``create_masks_for_generate``, used by vision-language wrappers such as gemma3, builds its masks).
4. ``modeling_flash_attention_utils._get_unpad_data``: one varlen sequence per document.
5. A guard (a global module forward hook, `guard`): the first time a transformers model runs a packed
   batch, `check_packing_support` decides from its modules whether the packed result can be exact; an
   unsupported model raises ``ValueError`` with the reason instead of returning what it computed.

Every contract (builder signatures, a document-mask probe per builder, the unpad probe) is checked before
the first set (`PatchSet`'s first phase). Modules imported while packing is configured hold our
pass-through; the undo finds them (by identity) and restores the original there too. The model-scoped
alternative, which patches nothing process-wide, is `am_packing.enable_packing`.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from ._contract import (
    RENAMED_PARAMETERS,
    contract_error,
    import_module_checked,
    parameter_name,
    require_callable,
    require_parameters,
    require_result,
)
from ._originals import MASK_BUILDERS, ORIGINALS, SCOPED_PREFIX, passthrough_marker, unpatched_builder
from ._patch import MISSING, GlobalPatch, ItemPatch, Patch, PatchSet, mark
from ._probes import PROBE_WINDOW, builder_what, call_builder
from .backends import VARLEN_ATTN_IMPLEMENTATION, cached_segments, cached_unpad_data, flash_unpad_data
from .marker import as_plain
from .mask import is_indexed_packed_mask, needs_a_look, packs_documents
from .support import PackingSupport, check_packing_support

__all__ = [
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "configure_packing",
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "get_attn_implementation",
    "unconfigure_packing",
]

# Backends whose varlen path takes the 2D indexed mask itself (unpadded per document).
_VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", VARLEN_ATTN_IMPLEMENTATION)
# Backends for which the indexed mask becomes a block-diagonal (sliding) causal mask. "te" is am-attention's
# Transformer Engine backend (named here as data, am-packing does not import am-attention): it receives the
# same 4D mask as sdpa, built by its AttentionMaskInterface entry, so every layer that falls back to SDPA
# (dropout in training, a layer TE skipped, torch.compile) stays exact; TE's own path runs THD when
# per-document position_ids come with the mask (the collator always emits them).
_MASK_BACKENDS = ("sdpa", "eager", "flex_attention", "te")
SUPPORTED_ATTN_IMPLEMENTATIONS: tuple[str, ...] = _MASK_BACKENDS + _VARLEN_BACKENDS


def get_attn_implementation(cfg_model: Any) -> str:
    """Attention backend named by a model config: ``backend.attn`` (custom models), else
    ``attn_implementation`` / ``_attn_implementation`` (HF), else ``"sdpa"``. Accepts mappings or objects."""

    def read(obj: Any, key: str) -> Any:
        if isinstance(obj, Mapping):
            return obj.get(key, MISSING)
        return getattr(obj, key, MISSING)

    backend = read(cfg_model, "backend")
    if backend is not MISSING and backend is not None:
        attn = read(backend, "attn")
        if attn is not MISSING and attn is not None:
            return str(attn)
    for key in ("attn_implementation", "_attn_implementation"):
        value = read(cfg_model, key)
        if value is not MISSING and value is not None:
            return str(value)
    return "sdpa"


def _split_arguments(sig: inspect.Signature, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    known = {k: v for k, v in kwargs.items() if k in sig.parameters}
    extra = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    return dict(sig.bind_partial(*args, **known).arguments), extra


def _cache_argument(arguments: dict, extra: dict) -> Any:
    """The KV cache a caller passed, under whichever spelling it used (the builder's, or a deprecated one
    that transformers' shim still accepts through ``**kwargs``)."""
    passed = {**extra, **arguments}
    return next((passed[n] for n in RENAMED_PARAMETERS["past_key_values"] if passed.get(n) is not None), None)


def _blocks_within_documents(block_ids: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """`block_ids` (bidirectional blocks, e.g. image tokens; not documents) split at document boundaries.

    The builders OR the block overlay in *after* ``and_mask_function``, so a block spanning two packed
    documents (paligemma's one prefix group per row, or gemma3 images ending one document and starting
    the next) would reopen attention between them. Pairing each block id with its document id keeps every
    block exactly as it is inside its document (what that document alone sees) and -1 (no block) as is.
    """
    if block_ids.shape[-1] != document_ids.shape[-1]:
        raise ValueError(
            f"block_sequence_ids of shape {tuple(block_ids.shape)} do not match the indexed packing mask of "
            f"shape {tuple(document_ids.shape)}"
        )
    block_ids = block_ids.to(device=document_ids.device, dtype=torch.long)
    span = document_ids.shape[-1] + 1  # document ids are < span, so (block, document) pairs stay distinct
    return torch.where(block_ids >= 0, block_ids * span + document_ids.to(torch.long), block_ids)


def _make_passthrough(builder: str) -> Any:
    """A packing-aware replacement for ``masking_utils.<builder>`` that reads the original at call time."""

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        original = _original(builder)
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if not needs_a_look(mask):
            return original(*args, **kwargs)
        sig = _SIGNATURES.get(builder) or inspect.signature(original)
        arguments, extra = _split_arguments(sig, args, kwargs)
        mask = as_plain(arguments["attention_mask"])
        arguments["attention_mask"] = mask
        config = arguments["config"]
        impl = getattr(config, "_attn_implementation", None)
        embeds = arguments.get("inputs_embeds")
        shape = tuple(embeds.shape[:2]) if isinstance(embeds, torch.Tensor) else None
        if not packs_documents(mask, shape) or str(impl).startswith(SCOPED_PREFIX):
            # 0/1 masks, and models prepared by enable_packing (their mask interface applies the documents)
            return original(**arguments, **extra)
        cache = _cache_argument(arguments, extra)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError(
                "an indexed packing mask cannot be combined with a non-empty KV cache "
                f"({cache.get_seq_length()} cached tokens); packing is for training/prefill from scratch"
            )
        if impl == VARLEN_ATTN_IMPLEMENTATION:
            return cached_segments(mask)  # the layers take the segments as they are (compile-clean)
        if impl in _VARLEN_BACKENDS:
            cached_unpad_data(mask)  # one sync here; every layer then reads the cache
            return mask
        if impl in _MASK_BACKENDS:
            masking = sys.modules["transformers.masking_utils"]
            if impl not in masking.AttentionMaskInterface._global_mapping:
                raise ValueError(
                    f"attn_implementation={impl!r} has no AttentionMaskInterface entry, so transformers would build "
                    "no mask and documents would attend to each other; register the backend first (for 'te': "
                    "am-attention's register_te_attention_backend or inject_te_attention)"
                )
            same_doc = masking.packed_sequence_mask_function(mask.to(torch.long))
            user_and = arguments.get("and_mask_function")
            if user_and is not None:
                same_doc = masking.and_masks(user_and, same_doc)
            # The document ids replace both the padding mask and transformers' position_ids packing
            # detection (which would cost another host sync and sees nothing the ids do not say).
            arguments.update(attention_mask=None, and_mask_function=same_doc)
            if "position_ids" in sig.parameters:
                arguments["position_ids"] = None
            if arguments.get("block_sequence_ids") is not None:
                arguments["block_sequence_ids"] = _blocks_within_documents(
                    arguments["block_sequence_ids"], mask
                )
            return original(**arguments, **extra)
        raise ValueError(
            f"an indexed packing mask reached attn_implementation={impl!r}, which am-packing cannot pack "
            f"exactly; supported: {list(SUPPORTED_ATTN_IMPLEMENTATIONS)}"
        )

    passthrough.__name__ = passthrough.__qualname__ = builder
    return passthrough


def _original(builder: str) -> Any:
    """transformers' own builder (also when the pass-through is called without configure_packing)."""
    return unpatched_builder(import_module_checked("transformers.masking_utils"), builder)


_SIGNATURES: dict[str, inspect.Signature] = {}
create_causal_mask = _make_passthrough("create_causal_mask")
create_sliding_window_causal_mask = _make_passthrough("create_sliding_window_causal_mask")
_PASSTHROUGHS = {
    "create_causal_mask": create_causal_mask,
    "create_sliding_window_causal_mask": create_sliding_window_causal_mask,
}
for _name, _fn in _PASSTHROUGHS.items():
    _fn.__doc__ = (
        f"Packing-aware `{_name}`: indexed packing masks become per-document masks (sdpa/eager/flex/te) or "
        "pass through untouched (flash/torch_varlen); anything else goes to transformers' original."
    )
    mark(_fn, passthrough_marker(_name))


def _builder_contract(builder: str) -> Any:
    def check(live: Any) -> None:
        what = builder_what(builder)
        sig = require_parameters(live, ["config", "attention_mask", "and_mask_function"], what)
        parameter_name(live, "past_key_values", what)  # exactly one spelling of the cache, any of the renames
        # The pass-through reads a positionally passed mask as args[2] (modeling code calls
        # `create_causal_mask(config, inputs_embeds, attention_mask, ...)` on some versions).
        positional = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        if len(positional) < 3 or positional[2] != "attention_mask":
            raise contract_error(
                what, f"expected attention_mask as the third positional parameter, found {positional[:3]}"
            )
        masking = sys.modules["transformers.masking_utils"]
        for helper in ("and_masks", "packed_sequence_mask_function"):
            require_callable(getattr(masking, helper, None), f"transformers.masking_utils.{helper}")

    return check


# Probe documents: [1 1 1 1 | 2 2 2], longer than the probe window for the sliding builder, and one
# image-like block spanning both documents (within the window), which must stay inside each document.
_PROBE_DOCUMENTS = (1, 1, 1, 1, 2, 2, 2)
_PROBE_BLOCKS = (0, 0, -1, -1, 0, 0, -1)


def _probe_document_mask(builder: str, original: Any) -> None:
    """Check on a tiny CPU input that `original` honours ``and_mask_function`` (the sdpa/eager/flex path).

    A document mask must come back as a block-diagonal causal (sliding) mask; transformers dropping or
    reinterpreting ``and_mask_function`` would otherwise leak attention across packed documents. Where the
    builder takes ``block_sequence_ids``, the probe passes a block crossing the document boundary as the
    pass-through would, and the block must stay bidirectional inside each document and never cross it.
    """
    ids = torch.tensor([_PROBE_DOCUMENTS])
    seq = ids.shape[1]
    q = torch.arange(seq)[:, None]
    kv = torch.arange(seq)[None, :]
    allowed = kv <= q
    if builder == "create_sliding_window_causal_mask":
        allowed &= q - kv < PROBE_WINDOW
    masking = sys.modules["transformers.masking_utils"]
    same_doc = masking.packed_sequence_mask_function(ids)
    kwargs: dict[str, Any] = dict(attention_mask=None, and_mask_function=same_doc)
    if "block_sequence_ids" in inspect.signature(original).parameters:
        blocks = torch.tensor([_PROBE_BLOCKS])
        kwargs["block_sequence_ids"] = _blocks_within_documents(blocks, ids)
        allowed |= (blocks[0][:, None] == blocks[0][None, :]) & (blocks[0][:, None] >= 0)
    expected = allowed & (ids[0][:, None] == ids[0][None, :])
    mask = call_builder(builder, original, "sdpa", seq, **kwargs)
    require_result(
        builder_what(builder),
        mask,
        lambda m: (
            isinstance(m, torch.Tensor)
            and m.dtype == torch.bool
            and m.shape[-2:] == (seq, seq)
            and bool(torch.equal(m.reshape(-1, seq, seq)[0], expected))
        ),
        f"with and_mask_function=<same document> a block-diagonal causal bool mask {expected.int().tolist()}",
    )


def _unpad_contract(live: Any) -> None:
    what = "transformers.modeling_flash_attention_utils._get_unpad_data"
    require_parameters(live, ["attention_mask"], what)
    result = live(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    require_result(
        what,
        result,
        lambda r: (
            isinstance(r, tuple)
            and len(r) == 3
            and r[0].tolist() == [0, 1, 3, 4, 5]
            and r[1].tolist() == [0, 2, 5]
            and int(r[2]) == 3
        ),
        "(indices [0, 1, 3, 4, 5], cu_seqlens [0, 2, 5], max_seqlen 3)",
    )


def _builder_check(builder: str) -> Any:
    """Phase-1 contract of a masking_utils builder: its signature, then the document-mask probe."""

    def check(live: Any) -> None:
        _builder_contract(builder)(live)
        _probe_document_mask(builder, live)

    return check


def _restore_late_modules(handle: PatchSet) -> None:
    """After the undo: modules imported while packing was configured bound our pass-through; restore them."""
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("transformers."):
            continue
        for builder, passthrough in _PASSTHROUGHS.items():
            if vars(module).get(builder) is passthrough:
                setattr(module, builder, ORIGINALS[builder])


def _build(attn_implementation: str) -> PatchSet:
    masking = import_module_checked("transformers.masking_utils")
    flash_utils = import_module_checked("transformers.modeling_flash_attention_utils")
    patches: list[Patch] = []
    for builder in MASK_BUILDERS:
        if vars(masking).get(builder, MISSING) is MISSING:
            raise contract_error(builder_what(builder), "the function no longer exists")
        original = unpatched_builder(masking, builder)
        ORIGINALS[builder] = original
        _SIGNATURES[builder] = inspect.signature(original)
        # Callers that adapt by signature (parameter_name, other packages' mask code) read it off the live
        # builder; the pass-through forwards to `original`, so it declares exactly its parameters.
        _PASSTHROUGHS[builder].__signature__ = _SIGNATURES[builder]
        patches.append(Patch(masking, builder, _PASSTHROUGHS[builder], contract=_builder_check(builder)))
        for name, module in sorted(sys.modules.items()):
            if name.startswith("transformers.models.") and module is not None:
                if vars(module).get(builder) is original:
                    patches.append(Patch(module, builder, _PASSTHROUGHS[builder]))
    patches += _layer_pattern_patches(masking)
    patches.append(Patch(flash_utils, "_get_unpad_data", flash_unpad_data, contract=_unpad_contract))
    patches += _guard_patches()
    handle = PatchSet(patches, name=f"am_packing.configure_packing({attn_implementation!r})")
    handle.on_revert.append(_restore_late_modules)
    return handle


def _bound(builder: str, partial: functools.partial) -> Any:
    """`partial` (arguments bound to transformers' `builder`) with our pass-through in its place."""
    passthrough = _PASSTHROUGHS[builder]

    def bound(*args: Any, **kwargs: Any) -> Any:
        return passthrough(*partial.args, *args, **{**partial.keywords, **kwargs})

    bound.__name__ = bound.__qualname__ = builder
    return mark(bound, f"{passthrough_marker(builder)}.partial")


def _layer_pattern_patches(masking: Any) -> list[Patch]:
    """Our pass-throughs in the layer-pattern table's entries that hold a builder (plain, or a partial of it)."""
    table = vars(masking).get("LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING")
    if not isinstance(table, dict):
        return []
    patches: list[Patch] = []
    for key, value in table.items():
        for builder, passthrough in _PASSTHROUGHS.items():
            if value is ORIGINALS[builder]:
                patches.append(
                    ItemPatch(table, key, passthrough, label="LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING")
                )
            elif isinstance(value, functools.partial) and value.func is ORIGINALS[builder]:
                patches.append(
                    ItemPatch(
                        table, key, _bound(builder, value), label="LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING"
                    )
                )
    return patches


# --------------------------------------------------------------------------- the model guard
# model -> its verdict, computed on its first call while packing is configured (weakly: models may go away)
_VERDICTS: weakref.WeakKeyDictionary[torch.nn.Module, PackingSupport] = weakref.WeakKeyDictionary()


def _verdict(model: torch.nn.Module) -> PackingSupport:
    verdict = _VERDICTS.get(model)
    if verdict is None:
        verdict = check_packing_support(model)
        if verdict.supported and verdict.position_offset:
            verdict = PackingSupport(
                False,
                f"{getattr(model.config, 'model_type', None)} ({type(model).__name__}): its position embeddings "
                f"count from padding_idx + 1 = {verdict.position_offset}, which the collator's per-document "
                "position_ids do not; enable_packing(model) shifts them",
                verdict.backend,
            )
        _VERDICTS[model] = verdict
    return verdict


def _make_guard(pretrained: type) -> Any:
    def guard(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Runs after every module call while packing is configured: keep the common path to one isinstance.
        if not isinstance(module, pretrained) or getattr(module, "config", None) is None:
            return
        verdict = _verdict(module)
        if verdict.supported:
            return
        mask = kwargs.get("attention_mask")
        if mask is None:
            names = list(inspect.signature(type(module).forward).parameters)[1:]
            if "attention_mask" in names and names.index("attention_mask") < len(args):
                mask = args[names.index("attention_mask")]
        if needs_a_look(mask) and is_indexed_packed_mask(mask):
            raise ValueError(f"configure_packing cannot pack {verdict.reason}")

    return mark(guard, "am_packing.configure_packing.guard")


def _guard_patches() -> list[Patch]:
    """The guard as a global forward hook with kwargs: two entries of torch's global hook registries."""
    from torch.nn.modules import module as nn_module
    from torch.utils.hooks import RemovableHandle
    from transformers import PreTrainedModel

    hooks = vars(nn_module).get("_global_forward_hooks")
    with_kwargs = vars(nn_module).get("_global_forward_hooks_with_kwargs")
    if not isinstance(hooks, dict) or not isinstance(with_kwargs, dict):
        raise RuntimeError(
            f"torch.nn.modules.module has no global forward hook registries (torch {torch.__version__}); "
            "configure_packing cannot guard unsupported models"
        )
    key = RemovableHandle(hooks).id  # a fresh id from torch's own hook counter (the handle is dropped)
    guard = _make_guard(PreTrainedModel)
    # torch only tests membership in the with-kwargs registry; the guard itself is the (marked) value
    return [
        ItemPatch(with_kwargs, key, guard, label="torch global forward hooks (with kwargs)"),
        ItemPatch(hooks, key, guard, label="torch global forward hooks"),
    ]


_CONFIGURED = GlobalPatch(_build)


def configure_packing(attn_implementation: str = "sdpa") -> PatchSet:
    """Make transformers honour indexed packing masks for `attn_implementation` (and every other supported one).

    Patches the mask builders of ``masking_utils`` and of every imported modeling module that holds them,
    plus flash-attention's ``_get_unpad_data``, after checking every contract. Idempotent (a second call
    returns the same handle); returns a handle with ``.revert()`` that is also a context manager. Undo:
    `unconfigure_packing`. Process-wide; `enable_packing(model)` is the model-scoped way.
    """
    if not isinstance(attn_implementation, str):
        raise TypeError(
            f"attn_implementation must be a str, got {type(attn_implementation).__name__}; "
            f"supported: {list(SUPPORTED_ATTN_IMPLEMENTATIONS)}"
        )
    if attn_implementation not in SUPPORTED_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} cannot be packed exactly; "
            f"supported: {list(SUPPORTED_ATTN_IMPLEMENTATIONS)}"
        )
    return _CONFIGURED.apply(attn_implementation)


def unconfigure_packing() -> None:
    """Undo `configure_packing`: restore every patched object exactly (no-op when not configured)."""
    _CONFIGURED.revert()
