"""A behaviour probe: does the stage path compute what the unsplit model computes?

The pipeline stages run a decoder as its own forward up to the first layer, then masks + rotary +
layers + final modules, then the causal LM's own head step. A model whose forward does anything else
(its own layer loop, a mask it edits, layer inputs the stages do not build) would be pipelined
silently wrong. So, where the weights are materialised, one short token sequence runs through the
unsplit forward and through the stage path of the same, unsplit model (one stage holding everything;
splitting then only moves where hidden states are handed on, provided no module is needed on both
sides of the layers, which the probe also checks); logits that differ, or a stage path that raises,
are a problem. Models on the meta device cannot be run: the probe is skipped and only the structural
checks apply."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .forwards import apply_lm_head
from .introspect import get_decoder, get_text_config, model_type, owned_layers
from .output_path import final_module_names

PROBE_LENGTH = 8


def _token_ids_named(node: Any, found: set[int]) -> None:
    items = node.items() if isinstance(node, dict) else ()
    for key, value in items:
        if isinstance(value, dict):
            _token_ids_named(value, found)
        elif isinstance(key, str) and "token" in key and ("id" in key or "index" in key):
            values = value if isinstance(value, (list, tuple)) else (value,)
            found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))


def probe_input_ids(model: nn.Module, device: torch.device) -> torch.Tensor:
    """[1, PROBE_LENGTH] token ids of the text vocabulary, avoiding every id the config names (image, pad, ...)."""
    config = model.config
    vocab = int(get_text_config(model).vocab_size)
    special: set[int] = set()
    _token_ids_named(config.to_dict() if hasattr(config, "to_dict") else {}, special)
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(0)).tolist()
    ids = [i for i in order if i not in special][:PROBE_LENGTH]
    return torch.tensor([ids], dtype=torch.long, device=device)


def _materialised(model: nn.Module) -> torch.device | None:
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.is_meta for t in tensors):
        return None
    return tensors[0].device


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return out[0] if logits is None else logits


def _tolerance(reference: torch.Tensor) -> float:
    # The stage path runs the same modules on the same inputs; only the mask's form may differ.
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    scale = max(1.0, float(reference.abs().max()))
    return max(1e-4, 8 * eps) * scale


def _stage_path(
    model: nn.Module, decoder: nn.Module, decoder_forward: Any, ids: torch.Tensor
) -> torch.Tensor:
    hidden = decoder_forward(decoder, input_ids=ids)
    if decoder is model:
        return hidden
    return apply_lm_head(model, hidden)


class _LayerTaps:
    """Per run: the first layer's first input, the last layer's last output, and which decoder
    children were called before the first layer and after the last one."""

    def __init__(self, decoder: nn.Module) -> None:
        layers = owned_layers(decoder)
        self.runs: list[dict[str, Any]] = []
        self.handles = []
        if layers:
            self.handles += [
                layers[0][1].register_forward_pre_hook(self._first),
                layers[-1][1].register_forward_hook(self._last),
            ]
        for name, child in decoder.named_children():
            if name != "layers":
                self.handles.append(child.register_forward_hook(self._child(name)))

    def start(self) -> None:
        self.runs.append({"before": set(), "after": set()})

    def _first(self, _module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            self.runs[-1].setdefault("first_input", args[0].detach())

    def _last(self, _module: nn.Module, _args: tuple, out: Any) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        if isinstance(hidden, torch.Tensor):
            self.runs[-1]["last_output"] = hidden.detach()

    def _child(self, name: str) -> Any:
        def record(_module: nn.Module, _args: tuple, _out: Any) -> None:
            run = self.runs[-1]
            if "first_input" not in run:
                run["before"].add(name)
            elif "last_output" in run:
                run["after"].add(name)

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def ownership_problem(self, decoder: nn.Module) -> str | None:
        """Modules the unsplit forward runs on both sides of the layers, which no one stage owns."""
        if not self.runs:
            return None
        before, after = self.runs[0]["before"], self.runs[0]["after"]
        finals = set(final_module_names(decoder))
        shared = sorted((before & finals) | (before & after))
        if shared:
            return (
                f"the decoder calls {shared} before its first layer and after its last; the first stage "
                "owns what runs before the layers and the last stage what runs after, so they cannot share it"
            )
        return None

    def where(self) -> str:
        """Which part of the forward the two runs first disagree on, in words."""
        if len(self.runs) == 2:
            unsplit, stage = self.runs
            for key, words in (
                (
                    "first_input",
                    "the input of the first layer differs: the decoder transforms the embeddings "
                    "before its first layer (positions, a norm, a scale outside the embedding module)",
                ),
                (
                    "last_output",
                    "the output of the last layer differs: the decoder runs its layers its own "
                    "way (a layer loop, a mask it edits, or layer inputs the stages do not build)",
                ),
            ):
                a, b = unsplit.get(key), stage.get(key)
                if (
                    a is not None
                    and b is not None
                    and (a.shape != b.shape or float((a - b).abs().max()) > _tolerance(a))
                ):
                    return words
        return (
            "the layers agree: the decoder or causal LM computes something between the last layer and the "
            "logits that is neither a final module nor the causal LM's head step"
        )


def probe_stage_path(model: nn.Module, decoder_forward: Any) -> str | None:
    """A problem when the stage path (`decoder_forward` on the unsplit decoder, then the head step)
    disagrees with `model`'s own forward on a probe input; None when they agree or the model is on meta.

    Runs in eval mode (restored afterwards) without gradients; changes nothing else on `model`.
    """
    device = _materialised(model)
    if device is None:
        return None
    decoder = get_decoder(model)
    kind = f"model_type {model_type(model)!r} ({type(model).__name__})"
    modes = {m: m.training for m in model.modules()}
    model.eval()
    taps = _LayerTaps(decoder)
    try:
        ids = probe_input_ids(model, device)
        with torch.no_grad():
            taps.start()
            try:
                reference = _logits(model(input_ids=ids, use_cache=False))
            except Exception as exc:  # any failure is the problem reported, not swallowed
                return (
                    f"{kind}: the unsplit forward fails on a probe of {PROBE_LENGTH} token ids "
                    f"({type(exc).__name__}: {exc}), so the pipeline stage path cannot be verified"
                )
            taps.start()
            try:
                got = _stage_path(model, decoder, decoder_forward, ids)
            except Exception as exc:  # any failure is the problem reported, not swallowed
                return (
                    f"{kind}: the pipeline stage path fails where the unsplit forward runs "
                    f"({type(exc).__name__}: {exc}); its decoder needs inputs or steps the stage "
                    "forwards do not provide"
                )
    finally:
        taps.remove()
        for module, training in modes.items():
            module.train(training)
    shared = taps.ownership_problem(decoder)
    if shared is not None:
        return f"{kind}: {shared}"
    if got.shape != reference.shape:
        return (
            f"{kind}: the pipeline stage path returns shape {tuple(got.shape)} where the unsplit forward "
            f"returns {tuple(reference.shape)}"
        )
    diff = float((got.float() - reference.float()).abs().max())
    tol = _tolerance(reference)
    if not diff <= tol:
        return (
            f"{kind}: the pipeline stage path does not reproduce the unsplit forward on a probe input "
            f"(max |logit diff| {diff:.3g} > {tol:.3g}): {taps.where()}; the "
            "stages would compute it differently, so the split is refused"
        )
    return None
