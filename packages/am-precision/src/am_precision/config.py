"""`BackendConfig` (which kernels a model's components use) and `TEFp8Config` (Transformer Engine FP8).

Defaults follow the machine: TE-backed choices only when transformer-engine is installed *and* CUDA is
available, evaluated when a config is built (never at import: importing must not touch CUDA). Values are
validated at construction: an unknown value or an invalid combination raises ValueError listing what is
allowed; an explicit TE choice without transformer-engine installed raises ImportError with the install
line. The one silent-in-the-seed adjustment (grouped experts without an expert-parallel dispatcher fall back
to `experts="torch_mm"`, `dispatcher="torch"`) is logged and recorded in `fallback_reasons`.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from . import availability

logger = logging.getLogger(__name__)

ATTN_CHOICES = ("te", "sdpa", "flex", "eager", "tilelang")
LINEAR_CHOICES = ("torch", "te")
RMS_NORM_CHOICES = ("torch", "torch_fp32", "te")
EXPERTS_CHOICES = ("torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8")
DISPATCHER_CHOICES = ("torch", "deepep", "hybridep", "uccl_ep")
EP_DISPATCHERS = ("deepep", "hybridep", "uccl_ep")
FP8_RECIPE_CHOICES = ("current", "block", "mxfp8")

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _te_default() -> bool:
    return availability.HAVE_TE and _cuda()


def dtype_from_str(value: str) -> torch.dtype:
    """`"float32"`, `"torch.float32"`, `"bf16"`, ... -> torch dtype; ValueError listing the accepted names."""
    if not isinstance(value, str):
        raise TypeError(
            f"dtype name must be a str such as 'bfloat16', got {type(value).__name__} {value!r:.80}"
        )
    key = value.strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(
            f"unknown dtype name {value!r}; expected one of {sorted(_DTYPE_NAMES)} (optionally 'torch.'-prefixed)"
        )
    return _DTYPE_NAMES[key]


def _te_recipe_module() -> Any:
    return importlib.import_module("transformer_engine.common.recipe")


@dataclass(kw_only=True)
class TEFp8Config:
    """Transformer Engine FP8 settings; its presence in `BackendConfig.te_fp8` turns FP8 on.

    `recipe` is `"current"` (Float8CurrentScaling), `"block"` (Float8BlockScaling), `"mxfp8"`
    (MXFP8BlockScaling: e4m3 data with e8m0 block scales, TE >= 2.3) or an already built TE recipe object,
    which is used as is. Without transformer-engine installed, `build_recipe()` returns None and
    `maybe_te_autocast()` is a no-op context.
    """

    recipe: Literal["current", "block", "mxfp8"] | Any = "current"

    def __post_init__(self) -> None:
        if isinstance(self.recipe, str):
            if self.recipe not in FP8_RECIPE_CHOICES:
                raise ValueError(
                    f"te_fp8.recipe={self.recipe!r} is not a recipe name; expected one of {list(FP8_RECIPE_CHOICES)} "
                    "or a transformer_engine.common.recipe object"
                )
        elif self.recipe is None or isinstance(
            self.recipe,
            (bool, int, float, complex, bytes, list, tuple, dict, set, frozenset, torch.Tensor, torch.dtype),
        ):
            # Anything else is taken as an already built TE recipe (TE is not imported to check its class).
            raise ValueError(
                f"te_fp8.recipe must be one of {list(FP8_RECIPE_CHOICES)} or a TE recipe object, "
                f"got {type(self.recipe).__name__} {self.recipe!r:.80}"
            )

    def build_recipe(self) -> Any:
        """The TE recipe object for `recipe` (None when transformer-engine is not installed)."""
        if not availability.HAVE_TE:
            return None
        if not isinstance(self.recipe, str):
            return self.recipe
        recipes = _te_recipe_module()
        if self.recipe == "mxfp8":
            cls = getattr(recipes, "MXFP8BlockScaling", None)
            if cls is None:
                raise ImportError(
                    "te_fp8.recipe='mxfp8' needs transformer_engine.common.recipe.MXFP8BlockScaling "
                    "(transformer-engine >= 2.3); the installed transformer-engine does not have it"
                )
            return cls()
        if self.recipe == "block":
            return recipes.Float8BlockScaling()
        return recipes.Float8CurrentScaling()

    def maybe_te_autocast(self) -> AbstractContextManager[Any]:
        """TE's FP8 autocast for this recipe, or a no-op context when transformer-engine is not installed.

        Uses `transformer_engine.pytorch.autocast(enabled=True, recipe=...)` (TE >= 2.8) and falls back to
        the older `fp8_autocast(enabled=True, fp8_recipe=...)`.
        """
        if not availability.HAVE_TE:
            return nullcontext()
        te = importlib.import_module("transformer_engine.pytorch")
        recipe = self.build_recipe()
        autocast = getattr(te, "autocast", None)
        if autocast is not None:
            return autocast(enabled=True, recipe=recipe)
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"BackendConfig.{name}={value!r} is not supported; expected one of {list(allowed)}")


def _bool(name: str, value: object, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"BackendConfig.{name}={value!r}; expected {allowed}")


@dataclass(kw_only=True)
class BackendConfig:
    """Which implementation each model component uses.

    attn: "te" | "sdpa" | "flex" | "eager" | "tilelang" (default "te" with TE+CUDA, else "sdpa").
    linear: "torch" | "te" (default "te" with TE+CUDA). rms_norm: "torch" | "torch_fp32" | "te".
    rope_fusion: fused RoPE, needs TE (default on with TE+CUDA). experts: "torch" (per-expert loop) |
    "te" (TE GroupedLinear) | "gmm" (grouped_gemm) | "torch_mm" (torch._grouped_mm, default on CUDA) |
    "torch_mm_mxfp8". dispatcher: "torch" | "deepep" | "hybridep" | "uccl_ep" (default DeepEP, then
    UCCL-EP, when installed and CUDA is available). enable_deepep: deprecated (True -> experts="gmm",
    dispatcher="deepep"; False -> dispatcher="torch"). fake_gate_noise in [0, 1]. te_fp8: a TEFp8Config
    (or its dict) turns FP8 on and needs linear="te" or experts="te". gate_precision: a floating dtype or
    its name ("float32", "torch.bfloat16", ...). compile_attn: compile the attention function.
    """

    attn: Literal["te", "sdpa", "flex", "eager", "tilelang"] = field(
        default_factory=lambda: "te" if _te_default() else "sdpa"
    )
    linear: Literal["torch", "te"] = field(default_factory=lambda: "te" if _te_default() else "torch")
    rms_norm: Literal["torch", "torch_fp32", "te"] = "torch_fp32"
    rope_fusion: bool = field(default_factory=_te_default)
    experts: Literal["torch", "te", "gmm", "torch_mm", "torch_mm_mxfp8"] = field(
        default_factory=lambda: "torch_mm" if _cuda() else "torch"
    )
    dispatcher: Literal["torch", "deepep", "hybridep", "uccl_ep"] = field(
        default_factory=lambda: (
            "deepep"
            if availability.HAVE_DEEP_EP and _cuda()
            else "uccl_ep"
            if availability.HAVE_UCCL_EP and _cuda()
            else "torch"
        )
    )
    dispatcher_num_sms: int = 20
    dispatcher_share_token_dispatcher: bool = True
    dispatcher_async_dispatch: bool = False
    enable_deepep: bool | None = None
    fake_balanced_gate: bool = False
    fake_gate_noise: float = 0.0
    enable_hf_state_dict_adapter: bool = True
    enable_fsdp_optimizations: bool = False
    te_fp8: TEFp8Config | None = None
    gate_precision: str | torch.dtype | None = None
    compile_attn: bool = False
    fallback_reasons: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _choice("attn", self.attn, ATTN_CHOICES)
        _choice("linear", self.linear, LINEAR_CHOICES)
        _choice("rms_norm", self.rms_norm, RMS_NORM_CHOICES)
        _choice("experts", self.experts, EXPERTS_CHOICES)
        _choice("dispatcher", self.dispatcher, DISPATCHER_CHOICES)
        for name in (
            "rope_fusion",
            "dispatcher_share_token_dispatcher",
            "dispatcher_async_dispatch",
            "fake_balanced_gate",
            "enable_hf_state_dict_adapter",
            "enable_fsdp_optimizations",
            "compile_attn",
        ):
            _bool(name, getattr(self, name))
        _bool("enable_deepep", self.enable_deepep, optional=True)
        if isinstance(self.dispatcher_num_sms, bool) or not isinstance(self.dispatcher_num_sms, int):
            raise ValueError(
                f"BackendConfig.dispatcher_num_sms={self.dispatcher_num_sms!r}; expected a positive int"
            )
        if self.dispatcher_num_sms <= 0:
            raise ValueError(
                f"BackendConfig.dispatcher_num_sms={self.dispatcher_num_sms!r}; expected a positive int"
            )
        if isinstance(self.fake_gate_noise, bool) or not isinstance(self.fake_gate_noise, (int, float)):
            raise ValueError(
                f"BackendConfig.fake_gate_noise={self.fake_gate_noise!r}; expected a float in [0, 1]"
            )
        if not 0.0 <= float(self.fake_gate_noise) <= 1.0:
            raise ValueError(
                f"BackendConfig.fake_gate_noise={self.fake_gate_noise!r}; expected a float in [0, 1]"
            )
        self.fake_gate_noise = float(self.fake_gate_noise)

        if isinstance(self.te_fp8, dict):
            unknown = sorted(map(str, set(self.te_fp8) - {"recipe"}))
            if unknown:
                raise ValueError(f"BackendConfig.te_fp8 has unknown keys {unknown}; expected only 'recipe'")
            self.te_fp8 = TEFp8Config(**self.te_fp8)
        elif self.te_fp8 is not None and not isinstance(self.te_fp8, TEFp8Config):
            raise ValueError(
                f"BackendConfig.te_fp8={self.te_fp8!r}; expected None, a TEFp8Config or its dict"
            )

        if isinstance(self.gate_precision, str):
            try:
                self.gate_precision = dtype_from_str(self.gate_precision)
            except ValueError as exc:
                raise ValueError(f"BackendConfig.gate_precision: {exc}") from None
        elif self.gate_precision is not None and not (
            isinstance(self.gate_precision, torch.dtype) and self.gate_precision.is_floating_point
        ):
            raise ValueError(
                f"BackendConfig.gate_precision={self.gate_precision!r}; expected None, a floating torch.dtype "
                f"or one of {sorted(_DTYPE_NAMES)}"
            )

        if self.enable_deepep is not None:
            warnings.warn(
                "BackendConfig(enable_deepep=...) is deprecated: use experts='gmm', dispatcher='deepep' "
                "(for True) or dispatcher='torch' (for False)",
                DeprecationWarning,
                stacklevel=3,
            )
            if self.enable_deepep:
                self.experts, self.dispatcher = "gmm", "deepep"
            else:
                self.dispatcher = "torch"
            self.enable_deepep = None

        if self.experts in ("te", "gmm") and self.dispatcher not in EP_DISPATCHERS:
            reason = (
                f"experts={self.experts!r} needs dispatcher in {list(EP_DISPATCHERS)}, got "
                f"dispatcher={self.dispatcher!r}: using experts='torch_mm', dispatcher='torch'"
            )
            logger.info(reason)
            self.fallback_reasons.append(reason)
            self.experts, self.dispatcher = "torch_mm", "torch"

        if self.te_fp8 is not None and self.linear != "te" and self.experts != "te":
            raise ValueError(
                "te_fp8 needs at least one TE backend (linear='te' or experts='te'), "
                f"got linear={self.linear!r}, experts={self.experts!r}"
            )

        if not availability.HAVE_TE:
            wants_te = [
                f"{name}={value!r}"
                for name, value in (
                    ("attn", self.attn),
                    ("linear", self.linear),
                    ("rms_norm", self.rms_norm),
                    ("experts", self.experts),
                )
                if value == "te"
            ]
            if self.rope_fusion:
                wants_te.append("rope_fusion=True")
            if self.te_fp8 is not None:
                wants_te.append("te_fp8")
            if wants_te:
                raise ImportError(
                    f"BackendConfig({', '.join(wants_te)}) needs transformer-engine, which is not installed: "
                    f"{availability.TE_INSTALL_HINT}"
                )

    @property
    def uses_te(self) -> bool:
        """True when any component runs on transformer-engine."""
        return (
            "te" in (self.attn, self.linear, self.rms_norm, self.experts)
            or self.rope_fusion
            or self.te_fp8 is not None
        )


__all__ = ["BackendConfig", "TEFp8Config"]
