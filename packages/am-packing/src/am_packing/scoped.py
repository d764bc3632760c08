"""`enable_packing(model)`: exact packing for one model, through transformers' own attention registries.

Design: why other models are unaffected, and why a model that was not enabled cannot train wrong.

1. The collator marks its mask. `PackingCollator`'s indexed mask is a `DocumentIdMask`, which refuses
   every use but moving, counting and metadata: the first thing an unprepared model does with it
   (transformers' ``attention_mask.to(torch.bool)``) raises ``ValueError`` naming `enable_packing`. Nothing
   process-wide is patched for that.
2. The model is pointed at a packed backend. `enable_packing(model, backend)` registers
   ``am_packed_<backend>`` in ``AttentionInterface`` (the backend's own attention function, looked up at
   call time) and in ``AttentionMaskInterface`` (the backend's own mask function with the document ids
   AND-ed into its mask function, as transformers' ``packed_sequence_mask_function``), and sets only this
   model's config to that name (one `Patch`, undone exactly). Other models keep their backends.
3. A forward pre-hook on the model takes the indexed mask out of each call (validated: one host sync),
   hands transformers a plain tensor, and keeps the ids in a ``ContextVar`` for that forward only. The
   mask entry applies them; without ids (another model sharing the config, another thread, a 0/1 mask)
   the entry is exactly the plain backend.
4. Guards, so that a model built differently refuses instead of leaking: the mask entry refuses ids whose
   shape does not match the mask it builds (a KV cache, a sub-model); the attention entry refuses a packed
   forward whose mask did not come through the entry; after the forward, a packed call that never
   dispatched attention through the registry raises.

Backends: sdpa, eager and flex_attention (the mask-based ones, block-diagonal masks in each backend's
format). For flash_attention_2/3 use `PackingCollator(mode="position_ids")` (transformers' own varlen
packing, exact without any patch) or the process-wide `configure_packing`.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections import Counter
from typing import Any

import torch

from ._patch import Patch, PatchSet
from .marker import as_plain
from .mask import document_positions, needs_a_look, packs_documents
from .scoped_registry import CURRENT, REGISTRIES, SCOPED_BACKENDS, Packed, scoped_name
from .support import check_packing_support, model_config, text_config

__all__ = ["disable_packing", "enable_packing", "is_packing_enabled"]

_USERS: Counter[str] = Counter()
_LOCK = threading.RLock()
_ENABLED: weakref.WeakKeyDictionary[torch.nn.Module, PatchSet] = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- the model side
def _positions(model: torch.nn.Module) -> dict[str, int]:
    params = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
    return {n: i for i, n in enumerate(params)}


def _argument(args: tuple, kwargs: dict, positions: dict[str, int], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = positions.get(name)
    return args[index] if index is not None and index < len(args) else None


def _set_argument(args: tuple, kwargs: dict, positions: dict[str, int], name: str, value: Any) -> tuple:
    index = positions.get(name)
    if name not in kwargs and index is not None and index < len(args):
        return (*args[:index], value, *args[index + 1 :])
    kwargs[name] = value
    return args


class _Hooks:
    """The forward pre/post hooks of one enabled model (thread-safe: one ContextVar token stack per thread)."""

    def __init__(self, model: torch.nn.Module, backend: str, position_offset: int = 0) -> None:
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        self.backend = backend
        self.position_offset = position_offset
        self.positions = _positions(model)
        self.local = threading.local()
        self.handles = [
            model.register_forward_pre_hook(self.before, with_kwargs=True),
            model.register_forward_hook(self.after, with_kwargs=True, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _stack(self) -> list:
        if not hasattr(self.local, "tokens"):
            self.local.tokens = []
        return self.local.tokens

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        stack = self._stack()
        stack.append(None)  # replaced by the token below; `after` also runs when this hook raises
        state = None
        mask = _argument(args, kwargs, self.positions, "attention_mask")
        if needs_a_look(mask):
            plain = as_plain(mask)
            reference = _argument(args, kwargs, self.positions, "input_ids")
            if reference is None:
                reference = _argument(args, kwargs, self.positions, "inputs_embeds")
            shape = tuple(reference.shape[:2]) if isinstance(reference, torch.Tensor) else None
            if packs_documents(plain, shape):
                self._refuse_cache(args, kwargs)
                if "use_cache" in self.positions:
                    args = _set_argument(args, kwargs, self.positions, "use_cache", False)
                device = reference.device if isinstance(reference, torch.Tensor) else plain.device
                state = Packed(plain.to(device=device, dtype=torch.long), self.model_type)
                if self.position_offset:
                    # RoBERTa-style embeddings count positions from padding_idx + 1 (padding at padding_idx),
                    # as they do for each document alone
                    positions = document_positions(state.ids) + self.position_offset
                    positions = positions.masked_fill(state.ids == 0, self.position_offset - 1)
                    args = _set_argument(args, kwargs, self.positions, "position_ids", positions)
            args = _set_argument(args, kwargs, self.positions, "attention_mask", plain)
        stack[-1] = CURRENT.set(state)
        return args, kwargs

    def _refuse_cache(self, args: tuple, kwargs: dict) -> None:
        for name in ("past_key_values", "cache"):
            if _argument(args, kwargs, self.positions, name) is not None:
                raise ValueError(
                    f"{name} was passed with an indexed packing mask; packing is for training and prefill "
                    "from scratch (pass no cache)"
                )
        if _argument(args, kwargs, self.positions, "use_cache") is True:
            raise ValueError(
                "use_cache=True was passed with an indexed packing mask; a packed forward builds no KV cache "
                "(pass use_cache=False or leave it unset)"
            )

    def after(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = self._stack()
        token = stack.pop() if stack else None
        if token is None:
            return
        state = CURRENT.get()
        CURRENT.reset(token)
        if output is None or state is None:
            return
        if state.mask_builds == 0:
            raise ValueError(
                f"a packed forward of {state.model_type} built no attention mask through transformers' mask "
                "builders, so am-packing cannot vouch for its document boundaries; this model is not supported "
                "by enable_packing"
            )
        # A model computing attention itself (not through AttentionInterface) reads the mask it was given;
        # only eager's additive float mask is the format such code expects.
        if state.attention_calls == 0 and self.backend != "eager":
            raise ValueError(
                f"a packed forward of {state.model_type} ran no attention through transformers' "
                f"AttentionInterface, so its own attention code reads a {self.backend} mask am-packing cannot "
                "vouch for; this model is not supported by enable_packing (try backend='eager', or configure_packing)"
            )


def enable_packing(model: torch.nn.Module, backend: str | None = None) -> PatchSet:
    """Make `model` (only it) run indexed packing masks exactly on `backend` (default: its current one).

    Registers ``am_packed_<backend>`` in transformers' attention and mask registries (shared by every enabled
    model, removed with the last one), points this model's config at it and hooks its forward; see the
    module docstring for the design. Idempotent; returns a handle (``.revert()``, context manager). Undo:
    the handle or `disable_packing(model)`. A model it cannot make exact is refused before anything changes,
    with the reason (`check_packing_support`, unsupported backends).
    """
    config = model_config(model)
    current = config._attn_implementation
    with _LOCK:
        live = _ENABLED.get(model)
        if live is not None and live.applied:
            if backend is not None and scoped_name(backend) != config._attn_implementation:
                raise ValueError(
                    f"packing is already enabled on this model for {config._attn_implementation!r}; "
                    "call disable_packing(model) before enabling another backend"
                )
            return live
        if backend is None:
            backend = current
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
        if backend not in SCOPED_BACKENDS:
            raise ValueError(
                f"backend={backend!r} is not one enable_packing packs: {list(SCOPED_BACKENDS)}; for flash "
                "attention use PackingCollator(mode='position_ids') (transformers' own varlen packing) or "
                "configure_packing"
            )
        model_type = getattr(config, "model_type", type(model).__name__)
        support = check_packing_support(model, backend)
        if not support.supported:
            raise ValueError(f"enable_packing cannot pack {support.reason}")
        REGISTRIES[backend].apply()  # both phases of its contracts; a no-op while another model uses it
        _USERS[backend] += 1
        # A composite config (vision-language, ...) points only its text model at the packed backend; the
        # other towers never see the packed text.
        configs = {id(c): c for c in (config, text_config(config))}.values()
        handle = PatchSet(
            [Patch(c, "_attn_implementation_internal", scoped_name(backend)) for c in configs],
            name=f"am_packing.enable_packing({model_type}, {backend!r})",
        )
        try:
            handle.apply()
            hooks = _Hooks(model, backend, support.position_offset)
        except BaseException:
            handle.revert()
            _release(backend)
            raise
        handle.on_revert.append(_undo_once(model, backend, hooks))
        _ENABLED[model] = handle
        return handle


def _undo_once(model: torch.nn.Module, backend: str, hooks: _Hooks) -> Any:
    """The model side of the undo (hooks, registry use, bookkeeping), run once however often it is called."""
    ref = weakref.ref(model)
    done = []

    def undo(handle: PatchSet) -> None:
        if done:
            return
        done.append(True)
        hooks.remove()
        with _LOCK:
            live = ref()
            if live is not None and _ENABLED.get(live) is handle:
                del _ENABLED[live]
            _release(backend)

    return undo


def _release(backend: str) -> None:
    with _LOCK:
        _USERS[backend] -= 1
        if _USERS[backend] <= 0:
            del _USERS[backend]
            REGISTRIES[backend].revert()


def disable_packing(model: torch.nn.Module) -> None:
    """Undo `enable_packing(model)` exactly (no-op when packing is not enabled on it)."""
    model_config(model)
    handle = _ENABLED.get(model)
    if handle is not None and handle.applied:
        handle.revert()


def is_packing_enabled(model: torch.nn.Module) -> bool:
    """Whether `enable_packing(model)` is in effect."""
    handle = _ENABLED.get(model) if isinstance(model, torch.nn.Module) else None
    return handle is not None and handle.applied
