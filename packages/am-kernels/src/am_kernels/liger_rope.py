"""The contract of the rope patch: the attention forward calls the module-level rope, and we can redirect it.

The patch binds a copy of the attention class's forward whose global lookup of the rope name
resolves to Liger's (`rebind.with_global`). Whether that copy really calls the replacement is
decided by behaviour, not by reading bytecode: a probe copy, built the same way with a stand-in
rope, is run on a tiny input, and the stand-in stops the forward as soon as it is called. And
transformers' rope itself is run on random tables: it must compute the formula Liger's computes.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch

from ._contract import contract_error
from .liger_plans import LigerPlan
from .rebind import with_global, wrapper_chain

# Our rope replacement is `(q, k, cos, sin, unsqueeze_dim=1)`; the attention forward calls it positionally.
_ROPE_PARAMETERS = ("q", "k", "cos", "sin", "unsqueeze_dim")


def _check_rope_signature(hf_rope: Any, what: str) -> None:
    # transformers >= 5.25 makes the rope an `nn.Module` instance (kernels' `use_kernel_forward_from_hub`);
    # calling it calls its forward, so that is the signature the attention forward's call must fit.
    callee = hf_rope.forward if isinstance(hf_rope, torch.nn.Module) else hf_rope
    try:
        sig = inspect.signature(callee)
    except (TypeError, ValueError) as exc:
        raise contract_error(what, f"its signature cannot be read ({exc})") from exc
    params = list(sig.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if (
        tuple(p.name for p in params) != _ROPE_PARAMETERS
        or any(p.kind not in positional for p in params)
        or any(p.default is not inspect.Parameter.empty for p in params[:4])
        or params[4].default != 1
    ):
        raise contract_error(
            what, f"expected the positional parameters (q, k, cos, sin, unsqueeze_dim=1), found {sig}"
        )


class _RopeReached(Exception):
    """Raised by the probe's stand-in rope: the forward got as far as the rope call; nothing after it runs."""


def _probe_inputs(module: Any, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden_states [1, 2, hidden] and cos/sin [1, 2, head_dim] on the module's device and dtype."""
    weight = next(module.parameters(), None)
    hidden_size = getattr(getattr(module, "config", None), "hidden_size", None)
    head_dim = getattr(module, "head_dim", None)
    if weight is None or not isinstance(hidden_size, int) or not isinstance(head_dim, int):
        raise contract_error(
            what, "expected an attention module with parameters, config.hidden_size and head_dim"
        )
    like = {"dtype": weight.dtype, "device": weight.device}
    return (
        torch.zeros(1, 2, hidden_size, **like),
        torch.ones(1, 2, head_dim, **like),
        torch.zeros(1, 2, head_dim, **like),
    )


def _probe_rope_call(module: Any, cls_forward: Any, rope_name: str, what: str) -> bool:
    """Run a copy of the forward with a stand-in rope; it must be called with the given cos and sin.

    Returns False when the forward never calls it (a NoPE layer, or a changed forward).
    """
    hidden, cos, sin = _probe_inputs(module, what)

    # Same parameters as our replacement, so a call our replacement could not take fails here too.
    def stand_in(q: Any, k: Any, cos_: Any, sin_: Any, unsqueeze_dim: int = 1) -> Any:
        raise _RopeReached(cos_ is cos and sin_ is sin)

    probe = with_global(cls_forward, rope_name, stand_in, what)
    try:
        # Called directly (not through the module), so no hooks run; no_grad keeps no graph.
        with torch.no_grad():
            probe(module, hidden_states=hidden, position_embeddings=(cos, sin), attention_mask=None)
    except _RopeReached as reached:
        if not reached.args[0]:
            raise contract_error(
                what, f"it calls {rope_name} with other cos/sin than its position_embeddings"
            ) from None
        return True
    except Exception as exc:
        raise contract_error(what, f"a probe call failed before reaching {rope_name} ({exc!r})") from exc
    return False


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rope_math(hf_rope: Any, module: Any, what: str) -> None:
    """transformers' rope must compute what Liger's does: q*cos + rotate_half(q)*sin over the whole head."""
    head_dim = module.head_dim
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    cos, sin = (torch.randn(1, 3, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    try:
        got = hf_rope(q, k, cos, sin)
    except Exception as exc:
        raise contract_error(what, f"a probe call on full-width cos/sin failed ({exc!r})") from exc
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    expected = (q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s)
    if not (
        isinstance(got, tuple)
        and len(got) == 2
        and all(isinstance(g, torch.Tensor) and g.shape == e.shape for g, e in zip(got, expected))
        and all(torch.allclose(g, e, rtol=1e-12, atol=1e-12) for g, e in zip(got, expected))
    ):
        raise contract_error(
            what,
            "it no longer computes q*cos + rotate_half(q)*sin over the whole head, which Liger's rope does",
        )


def checked_rope_target(
    module: Any, plan: LigerPlan, *, optional: bool = False
) -> tuple[types.FunctionType, Any, str] | None:
    """(class forward, transformers' rope, name for errors) of an attention module whose rope we can redirect.

    With `optional` (a plan with NoPE layers), None for a module whose forward never calls the rope.
    """
    cls_forward = type(module).forward
    what = f"{type(module).__module__}.{type(module).__qualname__}.forward"
    # The innermost function of the decorator chain is the one whose globals hold the rope.
    innermost = wrapper_chain(cls_forward, what)[-1]
    hf_rope = innermost.__globals__.get(plan.rope_function)
    if hf_rope is None:
        raise contract_error(what, f"{plan.rope_function} is not defined in {innermost.__module__}")
    rope_what = f"{innermost.__module__}.{plan.rope_function}"
    _check_rope_signature(hf_rope, rope_what)
    _check_rope_math(hf_rope, module, rope_what)
    if not _probe_rope_call(module, cls_forward, plan.rope_function, what):
        if optional:
            return None
        raise contract_error(
            what, f"it no longer calls the module-level {plan.rope_function} (a probe call never reached it)"
        )
    return cls_forward, hf_rope, what


__all__ = ["checked_rope_target"]
