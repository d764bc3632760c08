"""`DocumentIdMask`: the collator's indexed mask, marked so that no unprepared consumer can misread it.

An indexed packing mask is an ordinary integer tensor, and transformers turns any 2D integer mask into
a 0/1 padding mask (``attention_mask.to(torch.bool)``): a model that was not prepared for packing would
let every document attend to every other one, silently. `PackingCollator` therefore returns the mask
as a `DocumentIdMask`, a `torch.Tensor` subclass that

- travels like the tensor it wraps: ``.to(device)``, ``.cuda()``, ``.cpu()``, ``.pin_memory()``,
  ``.detach()``, ``.clone()``, row indexing, pickling and ``copy.deepcopy`` keep the marker, and metadata
  (``shape``, ``dtype``, ``device``, ``ndim``, ``size()``, ``numel()``, ...) reads normally;
- counts like the padding mask it stands for: ``mask.sum()`` is the number of non-padding tokens, so
  token counters that sum the attention mask (transformers' ``Trainer`` with
  ``include_num_input_tokens_seen="non_padding"``, TRL's ``num_tokens``) count tokens, not document ids;
- refuses everything else: a dtype conversion (``.to(torch.bool)``, ``.bool()``, ``.float()``), a
  comparison (``mask > 0``), arithmetic or any other torch function raises ``ValueError`` that names
  `am_packing.enable_packing`. That is what an unprepared model does first with its attention mask.

Models prepared with `enable_packing` (or the process-wide `configure_packing`) take the plain document
ids out (`as_plain`) before transformers sees them. ``mask.document_ids`` gives the plain tensor to code
that wants to read the ids.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DocumentIdMask", "as_plain"]

# Methods that move or copy the tensor without reading its values as attention: the result stays marked.
_TRANSPORT = frozenset(
    {
        "to",
        "cuda",
        "cpu",
        "pin_memory",
        "detach",
        "clone",
        "contiguous",
        "share_memory_",
        "__getitem__",
    }
)
# Metadata and raw reads that cannot be mistaken for attention semantics; results returned as they are.
_METADATA = frozenset(
    {
        "__get__",  # attribute getters: shape, dtype, device, ndim, is_cuda, requires_grad, ...
        "dim",
        "size",
        "numel",
        "nelement",
        "stride",
        "storage_offset",
        "element_size",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "is_pinned",
        "get_device",
        "data_ptr",
        "untyped_storage",
        "__len__",
        "__reduce_ex__",
        "tolist",
    }
)


def _is_dtype_change(mask: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a ``.to(...)`` call asks for another dtype (positionally, by keyword or through a tensor)."""
    wanted = [kwargs.get("dtype")] + [a for a in args[1:] if isinstance(a, torch.dtype)]
    wanted += [a.dtype for a in args[1:] if isinstance(a, torch.Tensor)]
    if isinstance(kwargs.get("other"), torch.Tensor):
        wanted.append(kwargs["other"].dtype)
    return any(w is not None and w != mask.dtype for w in wanted)


def _refusal(what: str) -> ValueError:
    return ValueError(
        f"attention_mask is a DocumentIdMask (packed document ids from am_packing.PackingCollator) and was "
        f"used as {what}; a model that was not prepared for packing reads it as a 0/1 padding mask and lets "
        "documents attend to each other. Call am_packing.enable_packing(model) before training (or use "
        "PackingCollator(mode='position_ids') for transformers-native packing); read the ids with "
        "mask.document_ids"
    )


class DocumentIdMask(torch.Tensor):
    """An indexed packing mask (int64 ``[B, S]``: 1-based document ids, 0 = padding) that refuses to be misread."""

    @staticmethod
    def __new__(cls, document_ids: torch.Tensor) -> DocumentIdMask:
        if not isinstance(document_ids, torch.Tensor):
            raise TypeError(f"document_ids must be a torch.Tensor, got {type(document_ids).__name__}")
        plain = as_plain(document_ids)
        if plain.dtype.is_floating_point or plain.dtype.is_complex or plain.dtype == torch.bool:
            raise TypeError(f"document_ids must have an integer dtype, got {plain.dtype}")
        return torch.Tensor._make_subclass(cls, plain, False)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "as_subclass":
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name in _TRANSPORT:
            if name == "to" and _is_dtype_change(args[0], args, kwargs):
                raise _refusal("a dtype conversion (.to)")
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return DocumentIdMask(out) if isinstance(out, torch.Tensor) else out
        if name in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "sum" and len(args) == 1 and not kwargs:
            # A full reduction is what token counters do with an attention mask: count the real tokens.
            with torch._C.DisableTorchFunctionSubclass():
                return (args[0] > 0).sum()
        raise _refusal(f"an operand of {name or func!r}")

    @property
    def document_ids(self) -> torch.Tensor:
        """The plain integer tensor of document ids (shares storage)."""
        return as_plain(self)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"DocumentIdMask({self.document_ids!r})"

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return format(repr(self), format_spec)

    def __deepcopy__(self, memo: dict) -> DocumentIdMask:
        return DocumentIdMask(self.document_ids.clone())


def as_plain(mask: Any) -> Any:
    """`mask` as a plain tensor when it is a `DocumentIdMask` (anything else is returned unchanged)."""
    if isinstance(mask, DocumentIdMask):
        return mask.as_subclass(torch.Tensor)
    return mask
