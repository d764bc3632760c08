"""Per-instance replacement forwards that call Liger's kernels (our glue, Liger's math).

Each builder returns a function taking `self`; the patcher binds it to one module instance.
The kernels come in a `LigerOps` bundle so that the glue is independent of where they come
from: `load_liger_ops()` imports liger-kernel (only when called), and CPU tests pass a pure
torch bundle to check the glue numerically where Liger's Triton kernels cannot run.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._repr import short_repr
from .availability import require_liger_kernel
from .sdpa import PinnedForward, sdpa_context


@dataclass(frozen=True)
class LigerOps:
    """The kernels the glue calls, with liger-kernel's functional signatures."""

    rms_norm: Callable[..., torch.Tensor]  # (x, weight, eps, offset, casting_mode, in_place)
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # silu(a) * b
    geglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # gelu_tanh(a) * b
    rotary_pos_emb: Callable[
        ..., tuple[torch.Tensor, torch.Tensor]
    ]  # (q, k, cos, sin, position_ids, unsqueeze_dim)
    # (hidden_states, lm_head_weight, labels, hidden_size, num_items_in_batch, ignore_index, shift_labels,
    #  final_logit_softcapping, **kw) -> loss; never materialises the logits.
    fused_linear_cross_entropy: Callable[..., torch.Tensor]
    cross_entropy: Callable[..., torch.Tensor]  # (logits, target, ignore_index=, reduction=)
    source: str = "liger-kernel"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "source":
                if not isinstance(value, str):
                    raise TypeError(f"LigerOps.source must be a str, got {short_repr(value)}")
            elif not callable(value):
                raise TypeError(f"LigerOps.{field.name} must be callable, got {short_repr(value)}")


# The leading parameters of liger-kernel's `LigerRopeFunction.forward` (after ctx) that the direct call passes.
_ROPE_PARAMETERS = ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim")


@functools.cache
def _rope_kernel() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Liger's Triton RoPE autograd function, called directly; else its public `liger_rotary_pos_emb`.

    liger-kernel >= 0.8.5 sends `liger_rotary_pos_emb` through its op `dispatch`, which it wraps in
    `torch.compiler.disable`: one graph break per attention layer in a compiled decoder layer. Its RMSNorm
    and SwiGLU call their autograd functions directly; so does this, for the same Triton kernel the
    dispatcher picks on NVIDIA GPUs (its "nvidia-triton" implementation). The function is used only
    when its forward takes the arguments it is given here, in this order.
    """
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return liger_rotary_pos_emb
    params = list(inspect.signature(LigerRopeFunction.forward).parameters)[1 : 1 + len(_ROPE_PARAMETERS)]
    if tuple(params) != _ROPE_PARAMETERS:
        return liger_rotary_pos_emb

    def rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return LigerRopeFunction.apply(q, k, cos, sin, position_ids, unsqueeze_dim)

    return rotary_pos_emb


def load_liger_ops() -> LigerOps:
    """Import liger-kernel's functional API (ImportError with the install line if missing)."""
    require_liger_kernel()
    from liger_kernel.transformers import functional as liger_functional
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    return LigerOps(
        rms_norm=liger_functional.liger_rms_norm,
        swiglu=liger_functional.liger_swiglu,
        geglu=liger_functional.liger_geglu,
        rotary_pos_emb=_rope_kernel(),
        fused_linear_cross_entropy=LigerForCausalLMLoss,
        cross_entropy=liger_functional.liger_cross_entropy,
    )


def _single_input(original: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    """Extract the one tensor argument of a one-input forward, positional or by its own name.

    Only the signature is kept, never `original` itself: a bound original would tie the
    replacement to the module it was read from, which is wrong on a deep copy of that module.
    """
    sig = inspect.signature(original)
    name = next(iter(sig.parameters))

    def take(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and not kwargs:
            (value,) = args
            return value
        return sig.bind(*args, **kwargs).arguments[name]

    return take


def method_function(original: Any, module: Any) -> Any:
    """The function behind `original` when it is bound to `module`, else None.

    Bound means a `types.MethodType` (the class forward, or an instance-level replacement) or our
    SDPA pin (`PinnedForward`, bound the same way but picklable); both rebind on `copy.deepcopy`.
    """
    if isinstance(original, (types.MethodType, PinnedForward)) and original.__self__ is module:
        return original.__func__
    return None


def rebindable(original: Callable[..., Any], module: Any) -> Callable[..., Any]:
    """`original` as a function of `self`, so that a copy of `module` calls its own original forward.

    A method bound to `module` (see `method_function`) is called through its `__func__` with whatever
    `self` the caller has. Any other callable (a foreign closure) cannot be rebound and is called as it is.
    """
    function = method_function(original, module)
    if function is not None:
        return function

    def call_as_is(self: Any, *args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    return call_as_is


def rms_norm_forward(
    original: Callable[..., Any],
    ops: LigerOps,
    *,
    eps_attr: str,
    offset: float,
    casting_mode: str,
    in_place: bool,
) -> Callable[..., torch.Tensor]:
    """RMSNorm forward through Liger; epsilon is read live from `eps_attr` on the module."""
    take = _single_input(original)

    def forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return ops.rms_norm(
            take(args, kwargs), self.weight, getattr(self, eps_attr), offset, casting_mode, in_place
        )

    return forward


def gated_mlp_forward(
    original: Callable[..., Any], ops: LigerOps, *, kind: str, layout: str = "gate_up_down"
) -> Callable[..., torch.Tensor]:
    """Gated MLP forward: down(act(gate(x)) * up(x)) with the activation-multiply fused by Liger.

    `layout` "fused_gate_up" reads gate and up as the two halves of one `gate_up_proj` (Phi3, GLM4).
    """
    take = _single_input(original)
    fused = {"swiglu": ops.swiglu, "geglu": ops.geglu}[kind]

    if layout == "fused_gate_up":

        def forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            gate, up = self.gate_up_proj(take(args, kwargs)).chunk(2, dim=-1)
            return self.down_proj(fused(gate, up))

        return forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = take(args, kwargs)
        return self.down_proj(fused(self.gate_proj(x), self.up_proj(x)))

    return forward


def liger_rope(ops: LigerOps) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` computed by Liger."""

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rotary_pos_emb(q, k, cos, sin, None, unsqueeze_dim)

    return apply_rotary_pos_emb


# Parameters of a transformers 5.x CausalLM forward that our fused path handles itself.
CAUSAL_LM_PARAMETERS = ("input_ids", "labels", "logits_to_keep")


def fused_linear_ce_forward(
    original: Callable[..., Any],
    module: Any,
    ops: LigerOps,
    *,
    softcap_attr: str | None,
    base_attr: str,
    cache_fields: tuple[str, str],
    sdpa_backends: tuple[Any, ...] | None = None,
) -> Callable[..., Any]:
    """CausalLM forward that, when training with labels, skips the logits and fuses lm_head + CE.

    Anything else (eval, generation, no labels) calls the original forward unchanged (on `self`,
    see `rebindable`), so the inference path is exactly transformers' own. `cache_fields` names
    the cache field of the base model's output and of `CausalLMOutputWithPast` as the installed
    classes declare it (`past_key_values`, or `cache` since 5.24), so no deprecated alias is read.
    `sdpa_backends` (the head's SDPA pin) is entered around the base model call of the fused path.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    sig = inspect.signature(original)
    var_kw = next(p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD)
    own = ("labels", "logits_to_keep", var_kw)
    call_original = rebindable(original, module)
    base_cache, output_cache = cache_fields

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = sig.bind(*args, **kwargs).arguments
        extra = dict(arguments.get(var_kw, {}))
        labels = arguments.get("labels")
        wants_loss = labels is not None or extra.get("shift_labels") is not None
        # MoE heads add the router's auxiliary loss to the loss, which the fused path does not compute.
        router = arguments.get("output_router_logits", extra.get("output_router_logits"))
        if router is None:
            router = getattr(self.config, "output_router_logits", False)
        if not (self.training and wants_loss) or router:
            return call_original(self, *args, **kwargs)
        return_dict = extra.pop("return_dict", None)
        shift_labels = extra.pop("shift_labels", None)
        base_inputs = {k: v for k, v in arguments.items() if k not in own}
        base = getattr(self, base_attr)
        if sdpa_backends is None:
            outputs = base(**base_inputs, **extra)
        else:
            with sdpa_context(sdpa_backends):
                outputs = base(**base_inputs, **extra)
        hidden = outputs.last_hidden_state
        keep = arguments.get("logits_to_keep", 0)
        hidden = hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
        softcap = getattr(self.config, softcap_attr) if softcap_attr is not None else None
        loss = ops.fused_linear_cross_entropy(
            hidden_states=hidden,
            lm_head_weight=self.lm_head.weight,
            labels=labels,
            shift_labels=shift_labels,
            hidden_size=self.config.hidden_size,
            final_logit_softcapping=softcap,
            **extra,
        )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{output_cache: getattr(outputs, base_cache)},
        )
        use_dict = self.config.return_dict if return_dict is None else return_dict
        return result if use_dict else result.to_tuple()

    return forward


def cross_entropy_loss(ops: LigerOps) -> Callable[..., torch.Tensor]:
    """transformers' ForCausalLMLoss with the cross entropy computed by Liger (logits stay in their dtype)."""

    def causal_lm_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if shift_labels is None:
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        logits = logits.reshape(-1, vocab_size)
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = ops.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    return causal_lm_loss


__all__ = ["LigerOps", "load_liger_ops"]
