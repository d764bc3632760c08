"""Bridge the legacy `_supports_flash_attn_2` class flag to `_supports_flash_attn`.

transformers renamed the flag: 5.3 still reads `_supports_flash_attn_2` in its FA2 check but
only `_supports_flash_attn` for FA3 and the kernels fallback; 5.5+ read the legacy name only
in an error message. Remote-code models written for older versions set only the legacy flag,
so their flash-attention support is invisible. `patch_legacy_flash_attn_flag()` installs a
property on `PreTrainedModel._supports_flash_attn` that answers the legacy flag when a subclass
sets neither name; classes that set `_supports_flash_attn` themselves shadow it as before.
"""

from __future__ import annotations

from typing import Any

from ._contract import contract_error, import_module_checked
from ._patch import PATCH_MARKER, GlobalPatch, Patch, PatchSet

__all__ = ["patch_legacy_flash_attn_flag", "unpatch_legacy_flash_attn_flag"]

_ATTR = "_supports_flash_attn"
_LEGACY = "_supports_flash_attn_2"
_NAME = "am_attention.legacy_flash_attn_flag"


class _LegacyFlagBridge(property):
    """A property that can carry our patch marker (plain `property` objects take no attributes)."""


def _make_bridge(base: type, default: Any) -> _LegacyFlagBridge:
    def _supports_flash_attn(self: Any) -> Any:
        for klass in type(self).__mro__:
            if klass is base:
                break
            own = vars(klass)
            if _ATTR in own:
                return own[_ATTR]
            if own.get(_LEGACY) is True:
                return True
        return default

    bridge = _LegacyFlagBridge(_supports_flash_attn)
    setattr(bridge, PATCH_MARKER, _NAME)
    return bridge


def _contract(live: Any) -> None:
    what = f"transformers.modeling_utils.PreTrainedModel.{_ATTR}"
    if isinstance(live, _LegacyFlagBridge):  # a bridge whose handle is gone (e.g. a reloaded am_attention)
        raise RuntimeError(f"{what} already holds a legacy-flag bridge that this process did not record")
    if not isinstance(live, bool):
        raise contract_error(what, f"expected a bool class attribute, found {live!r}")


def _build() -> PatchSet:
    base = import_module_checked("transformers.modeling_utils").PreTrainedModel
    # The bridge answers the original flag when no subclass says otherwise; the contract (phase 1 of
    # PatchSet.apply) refuses anything but a bool there before the bridge is set.
    bridge = _make_bridge(base, vars(base).get(_ATTR))
    return PatchSet([Patch(base, _ATTR, bridge, contract=_contract)], name="legacy_flash_attn_flag")


_FLAG = GlobalPatch(_build)


def patch_legacy_flash_attn_flag() -> PatchSet:
    """Install the bridge (idempotent); returns the handle, also undone by `unpatch_legacy_flash_attn_flag()`."""
    return _FLAG.apply()


def unpatch_legacy_flash_attn_flag() -> None:
    """Restore the original `PreTrainedModel._supports_flash_attn`; a no-op when not patched."""
    _FLAG.revert()
