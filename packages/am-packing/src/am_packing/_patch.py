"""The automodel-kit patch protocol: explicit, idempotent, reversible, checked patches.

This module is copied byte-for-byte into every am-* package that patches anything, so each
package stays vendorable alone; a test at the repository root keeps the copies identical.

A `Patch` changes one attribute (or one mapping entry) of one target. `check()` runs its
contract against the live value; `apply()` is a no-op when our replacement is already live, and
captures the original from the target's own `__dict__` (never through `getattr`, so a class
attribute is never copied onto an instance). `revert()` restores exactly that original, or deletes
the entry when there was none, and refuses to clobber a foreign patch stacked on top of ours.

`PatchSet` applies a list in two phases — every contract first, then every set — so a failed check
changes nothing; a failure while setting rolls back what was set. Its revert checks every patch
before restoring any. It is a context manager. `GlobalPatch` owns the one process-wide handle of a
patch set: applying again returns the live handle, and any undo (its own or the handle's) clears it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

PATCH_MARKER = "__am_patch__"


class _Missing:
    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


def mark(replacement: Any, name: str, wrapped: Any = None) -> Any:
    """Tag `replacement` as ours (`__am_patch__ = name`), copying `wrapped`'s metadata if given."""
    if wrapped is not None and callable(wrapped) and callable(replacement):
        functools.update_wrapper(replacement, wrapped)
    setattr(replacement, PATCH_MARKER, name)
    return replacement


def patch_name(obj: Any) -> str | None:
    """The `__am_patch__` marker of `obj`, or None when it is not one of our replacements."""
    return getattr(obj, PATCH_MARKER, None) if obj is not None else None


def _describe(target: Any, attr: Any) -> str:
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        name = type(target).__qualname__
    module = getattr(target, "__module__", None)
    if module and not isinstance(target, type) and getattr(target, "__name__", None) == module:
        module = None
    prefix = f"{module}." if module and module != name else ""
    return f"{prefix}{name}.{attr}"


class Patch:
    """One attribute of one target set to `replacement`, with the original kept for revert.

    `contract`, if given, is called with the live value before anything changes and must
    raise (RuntimeError naming the function and the transformers version) when the object
    to be patched no longer behaves as the replacement expects.
    """

    def __init__(
        self,
        target: Any,
        attr: str,
        replacement: Any,
        *,
        contract: Callable[[Any], None] | None = None,
    ) -> None:
        self.target = target
        self.attr = attr
        self.replacement = replacement
        self.contract = contract
        self.original: Any = MISSING
        self.applied = False
        # True when apply() found our replacement already live (set by another Patch object):
        # then this patch owns nothing, and revert() must leave the attribute alone.
        self.adopted = False

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return f"Patch({self.describe()}, {state})"

    def describe(self) -> str:
        return _describe(self.target, self.attr)

    # Storage primitives: attribute patches read the target's own __dict__.
    def _own(self) -> Any:
        try:
            return vars(self.target).get(self.attr, MISSING)
        except TypeError:  # objects without __dict__ (slots): fall back to the live value
            return getattr(self.target, self.attr, MISSING)

    def _live(self) -> Any:
        return getattr(self.target, self.attr, MISSING)

    def _set(self, value: Any) -> None:
        setattr(self.target, self.attr, value)

    def _delete(self) -> None:
        delattr(self.target, self.attr)

    def is_live(self) -> bool:
        """True when the target currently holds our replacement."""
        return self._own() is self.replacement

    def check(self) -> None:
        """Run the contract against the live value (nothing to check when ours is live already)."""
        if self.contract is not None and not self.is_live():
            self.contract(self._live())

    def apply(self, *, checked: bool = False) -> None:
        """Set the replacement; `checked=True` when `check()` has just run (PatchSet's first phase)."""
        if self.is_live():
            if not self.applied:
                self.adopted = True
                self.applied = True
            return
        if not checked:
            self.check()
        self.original = self._own()
        self._set(self.replacement)
        self.applied = True

    def check_revertible(self) -> None:
        """Raise RuntimeError when something else was patched over this (applied) patch."""
        if not self.applied or self.adopted:
            return
        current = self._own()
        if current is not self.replacement:
            raise RuntimeError(
                f"cannot revert the patch of {self.describe()}: something else was patched over it "
                f"(found {current!r}); revert that patch first"
            )

    def revert(self) -> None:
        if not self.applied:
            return
        if self.adopted:
            self.adopted = False
            self.applied = False
            return
        self.check_revertible()
        if self.original is MISSING:
            self._delete()
        else:
            self._set(self.original)
        self.original = MISSING
        self.applied = False


class ItemPatch(Patch):
    """One key of a mutable mapping (a registry such as transformers' AttentionInterface)."""

    def __init__(
        self,
        target: MutableMapping[Any, Any],
        key: Any,
        replacement: Any,
        *,
        contract: Callable[[Any], None] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(target, key, replacement, contract=contract)
        self.label = label

    def describe(self) -> str:
        return f"{self.label or type(self.target).__qualname__}[{self.attr!r}]"

    def _own(self) -> Any:
        return self.target.get(self.attr, MISSING)

    _live = _own

    def _set(self, value: Any) -> None:
        self.target[self.attr] = value

    def _delete(self) -> None:
        del self.target[self.attr]


class PatchSet:
    """Patches applied all-or-nothing and reverted in reverse order; also a context manager.

    `on_revert` callbacks run after a successful revert (a `GlobalPatch` forgets its handle there).
    """

    def __init__(self, patches: Iterable[Patch] = (), *, name: str = "") -> None:
        self.patches: list[Patch] = list(patches)
        self.name = name
        self.on_revert: list[Callable[[PatchSet], None]] = []

    def __repr__(self) -> str:
        return f"PatchSet({self.name!r}, {len(self.patches)} patches, applied={self.applied})"

    def __iter__(self):
        return iter(self.patches)

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def applied(self) -> bool:
        return bool(self.patches) and all(p.applied for p in self.patches)

    def add(self, patch: Patch) -> Patch:
        self.patches.append(patch)
        return patch

    def check(self) -> None:
        """Phase 1: every contract of every patch not yet applied; raises before anything changes."""
        for patch in self.patches:
            if not patch.applied:
                patch.check()

    def apply(self) -> PatchSet:
        self.check()
        done: list[Patch] = []
        try:
            for patch in self.patches:
                if not patch.applied:
                    patch.apply(checked=True)
                    done.append(patch)
        except BaseException:
            for patch in reversed(done):
                patch.revert()
            raise
        return self

    def check_revertible(self) -> None:
        """Raise RuntimeError when any patch of the set has something foreign stacked on it."""
        for patch in self.patches:
            patch.check_revertible()

    def revert(self) -> None:
        # Every patch is checked first, so a foreign patch never leaves the set half-reverted.
        self.check_revertible()
        for patch in reversed(self.patches):
            patch.revert()
        for callback in list(self.on_revert):
            callback(self)

    def __enter__(self) -> PatchSet:
        return self.apply()

    def __exit__(self, *exc: object) -> None:
        self.revert()


class GlobalPatch:
    """The one process-wide handle of a patch set: idempotent apply, and an undo that clears it.

    `build` makes the PatchSet when none is live (it may raise: nothing is changed then). The handle
    it returns can be reverted directly (context manager, `.revert()`) or through `revert()` here;
    either way the next `apply()` builds a fresh set.
    """

    def __init__(self, build: Callable[..., PatchSet]) -> None:
        self._build = build
        self._active: PatchSet | None = None
        self._lock = threading.RLock()

    @property
    def active(self) -> PatchSet | None:
        """The live handle, or None."""
        return self._active if self._active is not None and self._active.applied else None

    def apply(self, *args: Any, **kwargs: Any) -> PatchSet:
        with self._lock:
            if self.active is not None:
                return self._active  # type: ignore[return-value]
            handle = self._build(*args, **kwargs)
            handle.apply()
            handle.on_revert.append(self._forget)
            self._active = handle
            return handle

    def revert(self) -> None:
        """Undo the live handle (no-op when none is live)."""
        with self._lock:
            if self._active is not None:
                self._active.revert()
                self._active = None

    def _forget(self, handle: PatchSet) -> None:
        if self._active is handle:
            self._active = None
