"""The common opening of every pipeline forward, and the objects that carry a forward.

`PipelineForward` is a forward as a function of `self` (what the `create_pipeline_forward_*`
factories return): one opening (the call signature, no KV cache, no labels, no input the stage would
silently leave out), then a body per flavour (forwards.py). `BoundPipelineForward` binds one to a
module as `types.MethodType` does, but keeps the module as a plain attribute: `copy.deepcopy` rebinds
it to the copy (which then computes with its own weights), and pickle / `torch.save` store it with
the model (a method object pickles as `getattr(module, "forward")`, which on load would be the class
forward). Both are module-level classes with module-level bodies, so they pickle by reference.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._patch import mark
from .introspect import get_decoder, model_type
from .mask_cache import CausalMaskCache
from .run_layers import reject_cache

# Output switches of the unsplit forward: a stage returns one tensor, so they change nothing it computes.
_OUTPUT_SWITCHES = frozenset({"return_dict", "output_attentions", "output_hidden_states"})

_TOWERS = (
    "the stage forward of this model does not run its vision/audio towers (only the Mistral3 and "
    "Gemma4 VLM forwards merge images, on stage 0)"
)
_UNAPPLIED_REASONS = {
    "token_type_ids": "the unsplit model derives bidirectional attention between image tokens from it, "
    "and the stage forwards build causal masks only",
    "rope_deltas": "mrope position offsets are not applied; pass the full [3, batch, seq] position_ids",
    **dict.fromkeys(
        (
            "pixel_values",
            "pixel_values_videos",
            "image_sizes",
            "image_grid_thw",
            "video_grid_thw",
            "image_position_ids",
            "video_position_ids",
            "num_frames_per_video",
            "input_features",
            "input_features_mask",
            "mm_encoder_outputs",
        ),
        _TOWERS,
    ),
}
_UNAPPLIED_REASONS["mm_token_type_ids"] = _UNAPPLIED_REASONS["token_type_ids"]


@functools.lru_cache(maxsize=256)
def _named_inputs(classes: tuple[type, ...]) -> frozenset[str]:
    """Named parameters (not *args/**kwargs) of each class's forward."""
    names: set[str] = set()
    for cls in classes:
        try:
            params = inspect.signature(cls.forward).parameters.values()
        except (TypeError, ValueError):  # a forward whose signature cannot be read names nothing
            continue
        skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        names.update(p.name for p in params if p.kind not in skip and p.name != "self")
    return frozenset(names)


def _forward_chain(module: nn.Module) -> tuple[type, ...]:
    """The module's class and, for wrappers, its `model`'s: the unsplit forwards the inputs pass through."""
    inner = getattr(module, "model", None)
    return (type(module), type(inner)) if isinstance(inner, nn.Module) else (type(module),)


def refuse_unapplied_inputs(
    module: nn.Module, kwargs: dict[str, Any], takes: tuple[str, ...], *, to_backbone: bool
) -> None:
    """Raise ValueError for an input the unsplit forward applies but this stage forward would leave out.

    Inputs that no forward on the way names go to the layers' **kwargs in the unsplit model as well,
    so they pass. With `to_backbone`, inputs the decoder's own forward names are passed on to it
    (a pipeline forward there runs this same check).
    """
    named = _named_inputs(_forward_chain(module))
    passed_on = _named_inputs((type(get_decoder(module)),)) if to_backbone else frozenset()
    for name, value in kwargs.items():
        if value is None or name in takes or name in _OUTPUT_SWITCHES or name in passed_on:
            continue
        if name in named:
            reason = _UNAPPLIED_REASONS.get(name, "the stage forward does not apply it")
            raise ValueError(
                f"{type(module).__name__} (model_type {model_type(module)!r}) was given {name}, an input "
                f"of its unsplit forward that the pipeline stage forward does not apply: {reason}; refused "
                f"rather than computed without it (pass {name}=None, or run the model unsplit)"
            )


@dataclass
class StageCall:
    """One call of a stage forward after the common opening: the body's own inputs are in `options`."""

    input_ids: torch.Tensor | None
    attention_mask: Any
    position_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    options: dict[str, Any]
    kwargs: dict[str, Any]


class PipelineForward:
    """A pipeline forward as a function of `self`; picklable, and deep-copied with a fresh mask cache.

    `body(module, call, mask_cache)` is a module-level function; `takes` names the inputs it applies
    beyond the common ones; `to_backbone` says that it passes the remaining inputs to the decoder.
    Stored on a class it binds per instance like a function.
    """

    def __init__(
        self,
        body: Callable[[nn.Module, StageCall, CausalMaskCache | None], torch.Tensor],
        *,
        label: str,
        takes: tuple[str, ...] = (),
        to_backbone: bool = False,
        mask_cache: CausalMaskCache | None = None,
    ) -> None:
        self.body = body
        self.takes = takes
        self.to_backbone = to_backbone
        self.mask_cache = mask_cache
        self.__name__ = "pipeline_forward"
        self.__qualname__ = label

    def __call__(
        self,
        module: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        reject_cache(kwargs, use_cache)
        kwargs.pop("cache_position", None)
        if kwargs.pop("labels", None) is not None:
            raise ValueError("pipeline forwards return logits; compute the loss in the schedule's loss_fn")
        refuse_unapplied_inputs(module, kwargs, self.takes, to_backbone=self.to_backbone)
        options = {name: kwargs.pop(name, None) for name in self.takes}
        call = StageCall(input_ids, attention_mask, position_ids, inputs_embeds, options, kwargs)
        return self.body(module, call, self.mask_cache)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __repr__(self) -> str:
        return f"<am_pipelining forward {self.__qualname__}>"

    @property
    def __signature__(self) -> inspect.Signature:
        P = inspect.Parameter
        params = [P("self", P.POSITIONAL_OR_KEYWORD)]
        params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in ("input_ids", "attention_mask")]
        params.append(P("position_ids", P.POSITIONAL_OR_KEYWORD, default=None))
        params += [P(n, P.KEYWORD_ONLY, default=None) for n in ("inputs_embeds", "use_cache", *self.takes)]
        return inspect.Signature([*params, P("kwargs", P.VAR_KEYWORD)])


class BoundPipelineForward:
    """A `PipelineForward` bound to one module, like a method, but copied and pickled together with it.

    `handle` is the PatchSet that installed it (so a copy of a patched model can be unpatched too).
    """

    def __init__(self, func: PipelineForward, module: nn.Module, name: str) -> None:
        self.__func__ = func
        self.__self__ = module
        self.handle: Any = None
        mark(self, name)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.__func__.__qualname__} bound to {type(self.__self__).__name__}>"

    @property
    def mask_cache(self) -> CausalMaskCache | None:
        return self.__func__.mask_cache

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(self.__func__, self.__self__))
