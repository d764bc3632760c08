"""Behaviour probe: what an attention module's forward hands to transformers' attention interface.

The "te" backend relies on three things a forward does: it looks its attention function up in
transformers' `AttentionInterface` by `config._attn_implementation`, it passes its ``**kwargs``
(position_ids, cu_seq_lens_*) on to that function, and on windowed layers it passes
``sliding_window``. These are checked by calling the forward, never by reading its source or
bytecode: decorators (5.24 wraps every modeling forward in ``deprecate_kwarg``) and refactors change
the code without changing the behaviour, and a name in the bytecode does not prove a call.

The probe calls the class's forward on a shallow copy of the module that holds its own copy of the
config; that config selects a recording attention function registered under a unique temporary key
(no other model or thread ever asks for it), which raises on its first call with what it received,
so nothing after the attention call runs. The model is not changed: the copies are discarded and
the key is removed from the registry in ``finally``.
"""

from __future__ import annotations

import copy
import inspect
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from ._contract import contract_error, qualified_name, require_parameters, transformers_version
from .te_backend import _interfaces, te_attention_forward
from .te_dispatch import unknown_tensor_kwargs
from .te_params import AttnParams, proj_in_features

__all__ = ["check_dispatch", "selecting_config"]

CONFIG_ATTR = "_attn_implementation_internal"
_SENTINEL_KWARG = "_am_attention_probe"
_PROBE_TOKENS = 2  # two tokens: the smallest input on which a causal forward is not a special case


class _Dispatched(Exception):
    """Raised by the recording attention function: the keywords the forward passed to it."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("the attention interface was reached")
        self.kwargs = kwargs


def _record(*_args: Any, **kwargs: Any) -> NoReturn:
    raise _Dispatched(kwargs)


def selecting_config(config: Any, backend: str) -> Any:
    """A shallow copy of `config` whose `_attn_implementation` reads `backend`.

    Raises a contract error when configs no longer keep the backend in `_attn_implementation_internal`
    or the property no longer reads it: writing that field is how the injection selects "te".
    """
    if CONFIG_ATTR not in vars(config):
        raise contract_error(
            f"{type(config).__qualname__}.{CONFIG_ATTR}",
            "configs no longer store the attention backend there",
        )
    probe = copy.copy(config)
    setattr(probe, CONFIG_ATTR, backend)
    read = getattr(probe, "_attn_implementation", None)
    if read != backend:
        raise contract_error(
            f"{type(config).__qualname__}._attn_implementation",
            f"does not read {CONFIG_ATTR} (set to {backend!r} on a copy, it reads {read!r})",
        )
    return probe


@contextmanager
def _recording_backend() -> Iterator[str]:
    """A unique key that selects `_record` in transformers' attention registry while the block runs."""
    mapping = _interfaces()[0]._global_mapping
    key = f"am_attention_probe_{uuid.uuid4().hex}"
    mapping[key] = _record
    try:
        yield key
    finally:
        mapping.pop(key, None)


def _position_embedding_forms(head_dim: int, like: torch.Tensor) -> list[Any]:
    """Identity rotations in the forms attention forwards take, the most common first.

    The module alone does not reveal which form its model passes: (cos, sin) over the whole head (Llama
    and most), (cos, sin) over a partial rotary width (Phi, StableLM: a width-1 pair broadcasts to any
    width), (cos, sin) with a leading temporal/height/width axis (Qwen2-VL up to 5.5, whose rotary module
    did not fold the sections yet), or one complex `freqs_cis` tensor (Llama 4).
    """
    full, narrow = (1, _PROBE_TOKENS, head_dim), (1, _PROBE_TOKENS, 1)
    sections = (3, *full)
    return [
        (like.new_ones(full), like.new_zeros(full)),
        (like.new_ones(narrow), like.new_zeros(narrow)),
        (like.new_ones(sections), like.new_zeros(sections)),
        torch.ones(narrow, dtype=torch.complex64, device=like.device),
    ]


def _probe_inputs(
    module: torch.nn.Module, sig: inspect.Signature, sentinel: object | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """hidden_states [1, 2, hidden] on the module's device and dtype, and keywords for the forward's parameters.

    `sentinel` (None when the forward takes no ``**kwargs``) is passed under a private keyword, to be
    found again among the keywords the attention function receives.

    Required parameters the probe knows nothing about (Gemma 4's shared_kv_states) get None: layers that
    use them (Gemma 4's kv-sharing layers) fail the probe, but the verdict is per class and is taken on
    the class's first layer, which does not.
    """
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    device, dtype = (
        (weight.device, weight.dtype) if weight is not None else (torch.device("cpu"), torch.float32)
    )
    hidden = proj_in_features(module.q_proj)
    if hidden is None:
        raise ValueError("the input size of q_proj is unknown")
    keywords: dict[str, Any] = {}
    positions = torch.arange(_PROBE_TOKENS, device=device)
    if "position_ids" in sig.parameters or sentinel is not None:
        keywords["position_ids"] = positions[None]
    if "cache_position" in sig.parameters:  # decoders before 5.5 pass it (Ministral 3 scales queries by it)
        keywords["cache_position"] = positions
    if sentinel is not None:
        keywords[_SENTINEL_KWARG] = sentinel
    for param in list(sig.parameters.values())[2:]:  # after self and hidden_states
        if param.default is param.empty and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            keywords.setdefault(param.name, None)  # attention_mask None: the causal case
    return torch.zeros(1, _PROBE_TOKENS, hidden, device=device, dtype=dtype), keywords


def _reached_kwargs(
    module: torch.nn.Module, config: Any, hidden_states: torch.Tensor, keywords: dict[str, Any]
) -> dict[str, Any] | None:
    """The keywords the attention function selected by `config` received; None when the forward never called it."""
    probe = copy.copy(module)  # shares parameters and submodules; only its own config differs
    vars(probe)["config"] = config
    try:
        with torch.no_grad():
            type(module).forward(probe, hidden_states, **keywords)
    except _Dispatched as reached:
        return reached.kwargs
    return None


def _probe(
    module: torch.nn.Module, config: Any, sig: inspect.Signature, head_dim: int, sentinel: object | None
) -> dict[str, Any] | None:
    """`_reached_kwargs` on the first position-embedding form the forward gets past; raises the first failure."""
    hidden_states, keywords = _probe_inputs(module, sig, sentinel)
    if "position_embeddings" not in sig.parameters:
        return _reached_kwargs(module, config, hidden_states, keywords)
    failures: list[Exception] = []
    for form in _position_embedding_forms(head_dim, hidden_states):
        try:
            return _reached_kwargs(module, config, hidden_states, {**keywords, "position_embeddings": form})
        except Exception as exc:  # the wrong form for this model: try the next one
            failures.append(exc)
    raise failures[0]  # the common form's failure says most


def _skip(what: str, problem: str) -> str:
    return f"dispatch: {what} {problem} (installed transformers {transformers_version()})"


def _not_dispatched(module: torch.nn.Module, what: str) -> str:
    source = sys.modules.get(type(module).__module__)
    if source is not None and "scaled_dot_product_attention" in vars(source):
        return _skip(
            what,
            "does not dispatch through the attention interface (local import of scaled_dot_product_attention)",
        )
    return _skip(what, "does not dispatch through transformers' attention interface")


# Parameters through which a forward takes the keys/values of other states (cross-attention).
_CROSS_STATES = ("key_value_states", "encoder_hidden_states", "cross_attention_states")


def check_dispatch(module: torch.nn.Module, params: AttnParams) -> tuple[str, str | None]:
    """`(why the module keeps SDPA or "", sinks)`: whether `module`'s forward hands the "te" backend what it
    relies on, and the name of the module's parameter it passes as `s_aux` (learnable attention sinks), if any.

    Raises a contract error when the forward reaches the attention interface but drops its
    ``**kwargs`` or, on a windowed layer, ``sliding_window``: the kernel would then run without the
    packed-document boundaries or the window, which is a silent wrong result.
    """
    what = f"{qualified_name(type(module))}.forward"
    sig = require_parameters(getattr(type(module), "forward", None), (), what)
    config = getattr(module, "config", None)
    if config is None:
        return "config: module has no config to select the 'te' backend", None
    cross = [p for p in _CROSS_STATES if p in sig.parameters]
    if cross and getattr(module, "is_causal", True) is False:
        # the same module runs as self- or cross-attention depending on its caller: nothing in it says which
        return (
            f"cross-attention: {what} takes {cross[0]} (keys from other states) and is not causal; "
            "the kernel path takes causal self-attention only",
            None,
        )
    var_keyword = next(
        (p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )
    sentinel = object() if var_keyword is not None else None
    with _recording_backend() as key:
        probe_config = selecting_config(config, key)  # a broken config contract raises, never skips
        try:
            received = _probe(module, probe_config, sig, params.head_dim, sentinel)
        except Exception as exc:  # the forward cannot be shown to dispatch, so the module keeps SDPA
            first_line = next(iter(str(exc).splitlines()), "")
            return _skip(what, f"failed on a probe input ({type(exc).__name__}: {first_line})"), None
    if received is None:
        return _not_dispatched(module, what), None
    if var_keyword is None:
        raise contract_error(
            what, f"no longer accepts **kwargs {sig}, so position_ids/sliding_window cannot reach the backend"
        )
    if received.get(_SENTINEL_KWARG) is not sentinel:
        raise contract_error(what, f"no longer passes **{var_keyword} on to the attention interface")
    _check_window(what, params, received.get("sliding_window"))
    passed = received.get("sliding_window")
    if params.window_size[0] < 0 and isinstance(passed, int) and not isinstance(passed, bool):
        return f"window: {what} passes sliding_window={passed} on a layer that attends to all keys", None
    named = set(
        inspect.signature(te_attention_forward).parameters
    )  # bound to parameters, not **kwargs, there
    extra = unknown_tensor_kwargs(
        {k: v for k, v in received.items() if k != _SENTINEL_KWARG and k not in named}
    )
    if extra:
        return (
            f"inputs: {what} passes {', '.join(extra)} to the attention function, which the kernel does not take",
            None,
        )
    return _sinks(module, params, received.get("s_aux"))


def _sinks(module: torch.nn.Module, params: AttnParams, s_aux: Any) -> tuple[str, str | None]:
    """The module's parameter passed as `s_aux`: one sink logit per query head, taken by a learnable softmax."""
    if s_aux is None:
        return "", None
    name = next((n for n, p in module.named_parameters(recurse=False) if p is s_aux), None)
    if name is None:
        return "sinks: s_aux is not a parameter of the module, so the kernel cannot hold it", None
    if tuple(s_aux.shape) != (params.num_heads,):
        return (
            f"sinks: s_aux of shape {tuple(s_aux.shape)}, expected one per query head ({params.num_heads})",
            None,
        )
    return "", name


def _check_window(what: str, params: AttnParams, passed: Any) -> None:
    if params.window_size[0] < 0:
        return
    window = params.window_size[0] + 1
    if passed is None:
        raise contract_error(
            what, "has a sliding window but no longer passes sliding_window to the attention interface"
        )
    if passed != window:
        raise contract_error(
            what,
            f"passes sliding_window={passed!r} to the attention interface, but the layer's window is {window}",
        )
