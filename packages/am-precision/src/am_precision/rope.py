"""Read rotary-embedding settings from a transformers 5.x config (`config.rope_parameters`)."""

from __future__ import annotations

from typing import Any


def get_rope_config(config: Any, *, layer_type: str | None = None) -> tuple[float, dict, float]:
    """Return `(rope_theta, rope_parameters, partial_rotary_factor)` from `config.rope_parameters`.

    `partial_rotary_factor` is read from `rope_parameters`, then from the config attribute, else 1.0.
    Models with per-layer-type rotary settings (Gemma3: `{"full_attention": {...}, "sliding_attention":
    {...}}`) need `layer_type` to pick one; without it they raise ValueError listing the layer types.
    """
    if layer_type is not None and not isinstance(layer_type, str):
        raise TypeError(
            f"layer_type must be None or a str, got {type(layer_type).__name__} {layer_type!r:.80}"
        )
    rope_parameters = getattr(config, "rope_parameters", None)
    if not isinstance(rope_parameters, dict):
        raise ValueError(
            f"config ({type(config).__name__}) has no rope_parameters dict (found {rope_parameters!r:.80}); "
            "expected a transformers 5.x config with rope_parameters={'rope_theta': ..., ...}"
        )
    nested = {k: v for k, v in rope_parameters.items() if isinstance(v, dict)}
    if layer_type is not None:
        if layer_type not in nested:
            raise ValueError(
                f"layer_type={layer_type!r} not in rope_parameters of {type(config).__name__}; "
                f"expected one of {sorted(nested)}"
            )
        rope_parameters = nested[layer_type]
    elif "rope_theta" not in rope_parameters and nested:
        raise ValueError(
            f"{type(config).__name__} has per-layer-type rope_parameters {sorted(nested)}; "
            "pass layer_type= to choose one"
        )
    if "rope_theta" not in rope_parameters:
        raise ValueError(
            f"config.rope_parameters of {type(config).__name__} has no 'rope_theta': {rope_parameters!r}"
        )
    factor = rope_parameters.get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    if factor is None:
        factor = 1.0
    return float(rope_parameters["rope_theta"]), rope_parameters, float(factor)


__all__ = ["get_rope_config"]
