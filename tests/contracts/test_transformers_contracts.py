"""Every private transformers/torch object an am-* package patches or relies on, checked per version.

Three tables, one row per contract:
- `SIGNATURES`: the parameters our replacements and callers assume (by name, position, kind);
- `PROBES`: behaviour on a probe input (return arity and dtypes, mask semantics, registry dispatch,
  layer call conventions, rotary constructors, Liger-facing class layouts);
- `PATCHERS` (bottom): each package's public patcher applied to a tiny model and reverted, with the
  exact original objects (identity) restored.

Where a contract legitimately differs between transformers minors, the expectation is written for each
shape the object takes (told apart by what the installed object has, never by version number), never
skipped. Every failure names the
object, the package that relies on it and the installed transformers version.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from transformers import masking_utils, modeling_utils
from transformers import modeling_flash_attention_utils as flash_utils

from am_cli.tiny_models import build_config, build_model
from am_kernels._contract import RENAMED_PARAMETERS

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def _fail(what: str, packages: str, problem: str) -> AssertionError:
    return AssertionError(
        f"{what} (relied on by {packages}) broke its contract on transformers {transformers.__version__}: "
        f"{problem}"
    )


@contextmanager
def _contract(what: str, packages: str) -> Iterator[None]:
    """Re-raise any failure inside as an AssertionError naming the object and the transformers version."""
    try:
        yield
    except AssertionError as exc:
        if f"transformers {transformers.__version__}" in str(exc):
            raise
        raise _fail(what, packages, str(exc) or type(exc).__name__) from exc
    except Exception as exc:
        raise _fail(what, packages, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- tiny models
def _modeling(arch: str) -> types.ModuleType:
    return importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")


# Probe sizes applied to am-cli's built-in tiny models (am_cli.tiny_models: the one source of tiny models).
_PROBE_SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    attn_implementation="sdpa",
)


def _config(arch: str, **overrides: Any) -> Any:
    windowed = {"sliding_window": 4} if arch in ("gemma3", "mistral") else {}
    cfg = build_config(arch if arch in ARCHS else "qwen3", **_PROBE_SIZES, **windowed)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _causal_lm(arch: str, **overrides: Any) -> Any:
    return build_model(_config(arch, **overrides), attn_implementation="sdpa", seed=0).eval()


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(1, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _logits(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _resolve(path: str) -> Any:
    """`package.module.Object.attr` -> the object (imports the longest importable module prefix)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


# --------------------------------------------------------------------------- signatures
@dataclass(frozen=True)
class Sig:
    """`path` must accept `params` (by name, not only through **kwargs)."""

    path: str
    packages: str
    params: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()  # must be the first parameters, in order, positional-or-keyword
    exact: tuple[str, ...] | None = None  # the complete parameter list
    var_kw: bool = False  # must take **kwargs
    var_pos: bool = False  # must take *args


def _per_arch(template: str, packages: str, params: tuple[str, ...] = (), **kw: Any) -> list[Sig]:
    """One row per architecture in ARCHS (`{arch}` / `{Arch}` in `template`)."""
    rows = []
    for arch in ARCHS:
        prefix = {"qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}.get(arch, arch.capitalize())
        rows.append(Sig(template.format(arch=arch, Arch=prefix), packages, params, **kw))
    return rows


_MASK_PARAMS = (
    "config",
    "inputs_embeds",
    "attention_mask",
    "past_key_values",
    "position_ids",
    "and_mask_function",
)
_LAYER_PARAMS = ("hidden_states", "attention_mask", "position_ids", "past_key_values", "position_embeddings")
_MODELING = "transformers.models.{arch}.modeling_{arch}"

SIGNATURES: list[Sig] = [
    # am-packing's pass-through reads attention_mask as args[2]; am-pipelining calls with keywords.
    Sig("transformers.masking_utils.create_causal_mask", "am-packing, am-pipelining", _MASK_PARAMS,
        leading=("config", "inputs_embeds", "attention_mask")),
    Sig("transformers.masking_utils.create_sliding_window_causal_mask", "am-packing, am-pipelining", _MASK_PARAMS,
        leading=("config", "inputs_embeds", "attention_mask")),
    Sig("transformers.masking_utils.create_chunked_causal_mask", "am-pipelining", _MASK_PARAMS[:5]),
    Sig("transformers.masking_utils.and_masks", "am-packing", var_pos=True),
    Sig("transformers.modeling_flash_attention_utils._get_unpad_data", "am-packing", exact=("attention_mask",)),
    Sig("transformers.integrations.sdpa_attention.sdpa_attention_forward", "am-attention (te), am-packing",
        ("dropout", "scaling", "is_causal"), leading=("module", "query", "key", "value", "attention_mask"),
        var_kw=True),
    Sig("transformers.loss.loss_utils.ForCausalLMLoss", "am-kernels (liger cross_entropy)",
        leading=("logits", "labels", "vocab_size", "num_items_in_batch", "ignore_index", "shift_labels"),
        var_kw=True),
    Sig("torch.nn.attention.sdpa_kernel", "am-kernels (patch_sdpa_backends)", ("backends", "set_priority")),
    Sig("torch.nn.attention.varlen.varlen_attn", "am-packing (torch_varlen)", ("scale", "window_size", "enable_gqa"),
        leading=("query", "key", "value")),
    # Liger: the rope replacement has exactly transformers' signature; the fused loss reads these by name.
    *_per_arch(_MODELING + ".apply_rotary_pos_emb", "am-kernels (liger rope)",
               exact=("q", "k", "cos", "sin", "unsqueeze_dim")),
    *_per_arch(_MODELING + ".repeat_kv", "am-attention (te undoes repeat_kv)", exact=("hidden_states", "n_rep")),
    *_per_arch(_MODELING + ".{Arch}ForCausalLM.forward", "am-kernels (liger fused CE), am-pipelining",
               ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "labels", "logits_to_keep"),
               var_kw=True),
    # am-pipelining calls each layer as layer(hidden, attention_mask=, position_embeddings=, position_ids=,
    # past_key_values=None, **kw) and the rotary embedding as rotary(x, position_ids[, layer_type]).
    *_per_arch(_MODELING + ".{Arch}DecoderLayer.forward", "am-pipelining", _LAYER_PARAMS, var_kw=True),
    *_per_arch(_MODELING + ".{Arch}RotaryEmbedding.forward", "am-pipelining", leading=("self", "x", "position_ids")),
    *_per_arch(_MODELING + ".{Arch}Model.forward", "am-pipelining (causal-LM wrapper forward)",
               ("input_ids", "attention_mask", "position_ids", "inputs_embeds"), var_kw=True),
]  # fmt: skip


def _spelling(name: str, params: Any) -> str:
    """The installed spelling of `name`: a renamed parameter (RENAMED_PARAMETERS) may take any of its names."""
    return next((s for s in RENAMED_PARAMETERS.get(name, ()) if s in params), name)


def _check_signature(row: Sig) -> None:
    obj = _resolve(row.path)
    # An nn.Module (kernels makes transformers >= 5.25's rope one) is called through its forward.
    sig = inspect.signature(obj.forward if isinstance(obj, torch.nn.Module) else obj)
    params = sig.parameters
    names = list(params)
    kinds = {p.kind for p in params.values()}
    row = dataclasses.replace(
        row,
        params=tuple(_spelling(n, params) for n in row.params),
        leading=tuple(_spelling(n, params) for n in row.leading),
    )
    missing = [n for n in row.params + row.leading if n not in params]
    assert not missing, f"parameters {missing} missing from {sig}"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if row.leading:
        assert names[: len(row.leading)] == list(row.leading), (
            f"expected leading {list(row.leading)}, got {sig}"
        )
        bad = [n for n in row.leading if params[n].kind not in positional]
        assert not bad, f"{bad} are no longer positional in {sig}"
    keyword_ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    bad = [n for n in row.params if params[n].kind not in keyword_ok]
    assert not bad, f"{bad} cannot be passed by keyword in {sig}"
    if row.exact is not None:
        assert names == list(row.exact), f"expected exactly {list(row.exact)}, got {sig}"
    if row.var_kw:
        assert inspect.Parameter.VAR_KEYWORD in kinds, f"no **kwargs in {sig}"
    if row.var_pos:
        assert inspect.Parameter.VAR_POSITIONAL in kinds, f"no *args in {sig}"


@pytest.mark.parametrize("row", SIGNATURES, ids=lambda r: r.path.removeprefix("transformers."))
def test_signature(row: Sig) -> None:
    with _contract(row.path, row.packages):
        _check_signature(row)


# --------------------------------------------------------------------------- behaviour probes
def _sdpa_config(**overrides: Any) -> Any:
    return _config("llama", **overrides)


def _cache_name(fn: Callable[..., Any]) -> str:
    """The spelling of the cache parameter `fn` declares (past_key_values, or cache from 5.24)."""
    return _spelling("past_key_values", inspect.signature(fn).parameters)


def _mask_call(fn: Callable[..., Any], config: Any, embeds: torch.Tensor, **kwargs: Any) -> Any:
    call = dict(config=config, inputs_embeds=embeds, **{_cache_name(fn): None}, **kwargs)
    if "cache_position" in inspect.signature(fn).parameters:
        call["cache_position"] = torch.arange(embeds.shape[1])
    return fn(**call)


def _dense(mask: Any, seq: int) -> torch.Tensor:
    """A builder's sdpa output as a [B, S, S] bool "may attend" tensor (None = plain causal)."""
    if mask is None:
        return torch.ones(seq, seq, dtype=torch.bool).tril()[None]
    assert isinstance(mask, torch.Tensor) and mask.ndim == 4, f"expected a 4D mask, got {mask!r}"
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


DOCS = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])


def _same_doc(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
    return DOCS[batch_idx, q_idx] == DOCS[batch_idx, kv_idx]


def _expected(window: int | None = None) -> torch.Tensor:
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    allowed = (k <= q) & (DOCS[0][:, None] == DOCS[0][None, :])
    if window is not None:
        allowed &= k > q - window
    return allowed[None]


def probe_causal_mask_and_function() -> None:
    embeds = torch.zeros(1, 8, 32)
    mask = _mask_call(masking_utils.create_causal_mask, _sdpa_config(), embeds, attention_mask=None,
                      and_mask_function=_same_doc)  # fmt: skip
    got = _dense(mask, 8)
    assert torch.equal(got, _expected()), f"and_mask_function not honoured: got\n{got.int()}"


def probe_sliding_mask_and_function() -> None:
    embeds = torch.zeros(1, 8, 32)
    cfg = _config("mistral")
    mask = _mask_call(masking_utils.create_sliding_window_causal_mask, cfg, embeds, attention_mask=None,
                      and_mask_function=_same_doc)  # fmt: skip
    got = _dense(mask, 8)
    assert torch.equal(got, _expected(window=4)), (
        f"window 4 + and_mask_function not honoured: got\n{got.int()}"
    )


def probe_and_masks() -> None:
    fn = masking_utils.and_masks(lambda b, h, q, k: k <= q, lambda b, h, q, k: k >= q - 1)
    q, k = torch.arange(4)[:, None], torch.arange(4)[None, :]
    got = fn(torch.tensor(0), torch.tensor(0), q, k)
    assert torch.equal(got, (k <= q) & (k >= q - 1)), f"and_masks is not an elementwise AND: {got}"


def probe_get_unpad_data() -> None:
    indices, cu_seqlens, max_seqlen = flash_utils._get_unpad_data(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert indices.tolist() == [0, 1, 3, 4, 5], f"indices {indices.tolist()}"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5], f"cu_seqlens {cu_seqlens!r}"
    # Some minors (5.4 to 5.13) return max_seqlen as a 0-d int32 tensor, the others as a Python int;
    # am-packing's replacement returns an int on every version and flash attention accepts both.
    tensor_form = (
        isinstance(max_seqlen, torch.Tensor) and max_seqlen.ndim == 0 and not max_seqlen.is_floating_point()
    )
    assert isinstance(max_seqlen, int) or tensor_form, (
        f"max_seqlen {max_seqlen!r} (an int or a 0-d int tensor)"
    )
    assert int(max_seqlen) == 3, f"max_seqlen {max_seqlen!r} (expected 3)"


def probe_unpad_is_module_global() -> None:
    # configure_packing replaces the module attribute; that only reaches flash attention if the unpad
    # step looks `_get_unpad_data` up as a module global at call time.
    callers = [
        n for n, f in vars(flash_utils).items()
        if inspect.isfunction(f) and "_get_unpad_data" in f.__code__.co_names
    ]  # fmt: skip
    assert callers, "no function of modeling_flash_attention_utils calls _get_unpad_data by its global name"


def probe_modeling_module_copies() -> None:
    from am_packing import find_causal_mask_modules

    found = find_causal_mask_modules()
    for arch in ARCHS:
        name = f"transformers.models.{arch}.modeling_{arch}"
        module = _modeling(arch)
        assert name in found, f"{name} not found by the source scan of mask builder imports"
        for builder in found[name]:
            assert vars(module).get(builder) is getattr(masking_utils, builder), (
                f"{name}.{builder} is not masking_utils.{builder} (configure_packing finds copies by identity)"
            )
        assert "create_causal_mask" in _modeling(arch).__dict__, f"{name} holds no create_causal_mask"


def probe_registries() -> None:
    for owner, what in (
        (modeling_utils.AttentionInterface, "AttentionInterface"),
        (masking_utils.AttentionMaskInterface, "AttentionMaskInterface"),
    ):
        mapping = vars(owner).get("_global_mapping")
        assert isinstance(mapping, dict) and "sdpa" in mapping, f"{what}._global_mapping is {mapping!r}"
    assert (
        modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
        is modeling_utils.AttentionInterface._global_mapping["sdpa"]
    )


def probe_registry_dispatch() -> None:
    """A `_global_mapping` entry is what a model with config._attn_implementation=key calls (attention and mask)."""
    model = _causal_lm("llama")
    ids = _ids()
    reference = _logits(model, ids)
    sdpa = modeling_utils.AttentionInterface._global_mapping["sdpa"]
    sdpa_mask = masking_utils.AttentionMaskInterface._global_mapping["sdpa"]
    calls: list[tuple] = []
    mask_calls: list[dict] = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((tuple(query.shape), tuple(key.shape), sorted(kwargs)))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    def mask(*args, **kwargs):
        mask_calls.append(kwargs)
        return sdpa_mask(*args, **kwargs)

    attn_map = modeling_utils.AttentionInterface._global_mapping
    mask_map = masking_utils.AttentionMaskInterface._global_mapping
    attn_map["am_contract_probe"], mask_map["am_contract_probe"] = attention, mask
    try:
        model.config._attn_implementation_internal = "am_contract_probe"
        got = _logits(model, ids, position_ids=torch.arange(8).expand(2, 8))
    finally:
        del attn_map["am_contract_probe"], mask_map["am_contract_probe"]
    assert len(calls) == 2, f"registered attention called {len(calls)} times for 2 layers"
    q_shape, k_shape, kwargs = calls[0]
    assert q_shape == (2, 4, 8, 8), (
        f"query reaches the attention function as {q_shape}, expected [B, H, S, D]"
    )
    assert k_shape[1] in (2, 4), f"key has {k_shape[1]} heads, expected kv heads (2) or repeated (4)"
    assert {"scaling", "position_ids"} <= set(kwargs), f"attention kwargs {kwargs} lack scaling/position_ids"
    assert mask_calls, "the registered mask function was not called"
    assert {"attention_mask", "kv_length"} <= set(mask_calls[0]), f"mask kwargs {sorted(mask_calls[0])}"
    torch.testing.assert_close(got, reference, rtol=0, atol=0)


def probe_config_attn_internal() -> None:
    cfg = _causal_lm("llama").config
    assert "_attn_implementation_internal" in vars(cfg), "the backend is not stored in config.__dict__"
    cfg._attn_implementation_internal = "eager"
    assert cfg._attn_implementation == "eager", (
        "config._attn_implementation does not read _attn_implementation_internal"
    )


def probe_supports_flash_attn() -> None:
    base = modeling_utils.PreTrainedModel
    assert isinstance(vars(base).get("_supports_flash_attn"), bool), (
        "PreTrainedModel._supports_flash_attn not a bool"
    )
    assert _modeling("llama").LlamaPreTrainedModel._supports_flash_attn is True


class _LegacyFlagModel(modeling_utils.PreTrainedModel):
    """A remote-code style model that sets only the legacy flag."""

    config_class = transformers.PretrainedConfig
    _supports_flash_attn_2 = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.proj = torch.nn.Linear(2, 2)


def _flash_dispatch_sees_support(model: Any) -> bool:
    """Run transformers' FA2 dispatch check; True when it got past the model's support flag."""
    check = getattr(model, "_flash_attn_can_dispatch", None)
    try:
        check(2) if check is not None else model._flash_attn_2_can_dispatch()
    except ValueError as exc:
        if "does not support Flash Attention" in str(exc):
            return False
        raise
    except ImportError:  # flash-attn is not installed: the support flag was accepted
        return True
    return True


def _legacy_flash_check() -> bool:
    """The 5.3 form: an FA2-only dispatch check (`_flash_attn_2_can_dispatch`); 5.4+ have `_flash_attn_can_dispatch`."""
    return hasattr(modeling_utils.PreTrainedModel, "_flash_attn_2_can_dispatch")


def probe_flash_dispatch_flag() -> None:
    """The FA2-only check (5.3) reads `_supports_flash_attn_2`; the renamed check reads only `_supports_flash_attn`."""
    model = _LegacyFlagModel(transformers.PretrainedConfig())
    if _legacy_flash_check():
        assert _flash_dispatch_sees_support(model), (
            "the FA2-only check should still honour _supports_flash_attn_2"
        )
    else:
        assert hasattr(modeling_utils.PreTrainedModel, "_flash_attn_can_dispatch"), (
            "neither the FA2-only nor the renamed FA dispatch check exists"
        )
        assert not _flash_dispatch_sees_support(model), (
            "the FA check honours _supports_flash_attn_2 again; patch_legacy_flash_attn_flag assumes it reads "
            "only _supports_flash_attn"
        )


def probe_attention_dispatch() -> None:
    from am_attention import infer_attn_params, plan_te_attention

    for arch in ARCHS:
        model = _causal_lm(arch)
        attn = model.model.layers[0].self_attn
        # a behaviour probe (the forward is called with a recording backend), not a bytecode read
        taken, reason = next(
            (t, r) for n, t, r in plan_te_attention(model) if n == "model.layers.0.self_attn"
        )
        assert taken, f"{type(attn).__qualname__}.forward: {reason}"
        for attr, kind in (("scaling", float), ("head_dim", int), ("is_causal", bool)):
            assert isinstance(getattr(attn, attr, None), kind), (
                f"{type(attn).__qualname__}.{attr} is not {kind}"
            )
        params = infer_attn_params(attn)
        assert params is not None and (params.num_heads, params.num_kv_heads, params.head_dim) == (4, 2, 8), (
            f"{type(attn).__qualname__}: inferred {params}"
        )
        window = 4 if arch in ("mistral", "gemma3") else None  # gemma3 layer 0 is a sliding layer
        assert params.window_size == ((window - 1, 0) if window else (-1, 0)), (
            f"{type(attn).__qualname__}: window {params.window_size}, expected sliding_window={window}"
        )


def probe_repeat_kv_layout() -> None:
    x = torch.randn(2, 3, 5, 4)
    for arch in ARCHS:
        out = _modeling(arch).repeat_kv(x, 2)
        assert out.shape == (2, 6, 5, 4) and torch.equal(out[:, ::2], x) and torch.equal(out[:, 1::2], x), (
            f"modeling_{arch}.repeat_kv no longer repeats each kv head contiguously"
        )


def probe_apply_rotary() -> None:
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1)

    want_q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    want_k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    for arch in ARCHS:
        got_q, got_k = _modeling(arch).apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(
            (got_q, got_k), (want_q, want_k), msg=f"modeling_{arch}.apply_rotary_pos_emb"
        )


def _stage_loop(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The decoder forward as am-pipelining's stage forward calls the pieces."""
    decoder = model.model
    config = decoder.config
    hidden = decoder.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    layer_types = [
        (config.layer_types[i] if getattr(config, "layer_types", None) else
         ("sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"))
        for i in range(len(decoder.layers))
    ]  # fmt: skip
    builders = {"full_attention": masking_utils.create_causal_mask,
                "sliding_attention": masking_utils.create_sliding_window_causal_mask}  # fmt: skip
    masks = {lt: _mask_call(builders[lt], config, hidden, attention_mask=None, position_ids=position_ids)
             for lt in set(layer_types)}  # fmt: skip
    rotary = decoder.rotary_emb
    takes_type = "layer_type" in inspect.signature(type(rotary).forward).parameters
    extra = {_cache_name(type(decoder.layers[0]).forward): None}
    if "cache_position" in inspect.signature(type(decoder.layers[0]).forward).parameters:
        extra["cache_position"] = torch.arange(ids.shape[1])
    for layer, lt in zip(decoder.layers, layer_types):
        pe = rotary(hidden, position_ids, lt) if takes_type else rotary(hidden, position_ids)
        out = layer(hidden, attention_mask=masks[lt], position_embeddings=pe, position_ids=position_ids,
                    **extra)  # fmt: skip
        hidden = out[0] if isinstance(out, tuple) else out
        assert isinstance(hidden, torch.Tensor), f"{type(layer).__qualname__} returned {type(out)}"
    return decoder.norm(hidden)


def probe_layer_call_convention() -> None:
    """Layers/rotary/mask builders called the pipelining way reproduce the decoder's own forward."""
    for arch in ("llama", "mistral", "gemma3"):
        model = _causal_lm(arch)
        ids = _ids(1, 8)
        with torch.no_grad():
            want = model.model(input_ids=ids, use_cache=False).last_hidden_state
            got = _stage_loop(model, ids)
        torch.testing.assert_close(
            got, want, msg=f"{arch}: stage loop != {type(model.model).__qualname__}.forward"
        )


def probe_cache_position_versions() -> None:
    """cache_position: required by the builders (5.3), optional (5.4, 5.5) or gone; callers pass it only where
    declared, so the contract is that a builder requiring it goes with layers that take it."""
    builder = inspect.signature(masking_utils.create_causal_mask).parameters.get("cache_position")
    layer = inspect.signature(_modeling("llama").LlamaDecoderLayer.forward).parameters.get("cache_position")
    if builder is not None and builder.default is inspect.Parameter.empty:
        assert layer is not None, "the builders require cache_position but decoder layers do not take it"
    else:
        assert builder is None or builder.default is None, f"cache_position must be optional, got {builder}"


def probe_rotary_constructor() -> None:
    """init_hf_model_buffers rebuilds rotary modules as type(m)(m.config) on the target device."""
    from am_pipelining import init_hf_model_buffers

    for arch in ("llama", "gemma3"):
        reference = _causal_lm(arch).model.rotary_emb
        with torch.device("meta"):
            meta_model = _causal_lm(arch)
        rotary = meta_model.model.rotary_emb
        names = [n for n, _ in rotary.named_buffers(recurse=False)]
        assert names and all(n.endswith("inv_freq") for n in names), (
            f"{type(rotary).__qualname__} buffers {names}"
        )
        assert set(names) <= rotary._non_persistent_buffers_set, f"rotary buffers {names} became persistent"
        with torch.device("cpu"):
            fresh = type(rotary)(rotary.config)
        for name, buf in reference.named_buffers(recurse=False):
            torch.testing.assert_close(dict(fresh.named_buffers())[name], buf, msg=f"{arch} {name}")
        init_hf_model_buffers(meta_model.model, "cpu")
        for name, buf in reference.named_buffers(recurse=False):
            torch.testing.assert_close(
                dict(rotary.named_buffers())[name], buf, msg=f"{arch} {name} after init"
            )
        scaling = {k: v for k, v in vars(reference).items() if k.endswith("attention_scaling")}
        assert scaling, f"{type(rotary).__qualname__} has no *attention_scaling attribute"
        got = {k: v for k, v in vars(rotary).items() if k.endswith("attention_scaling")}
        assert got == scaling, f"attention scaling {got} != {scaling}"


def probe_liger_layouts() -> None:
    """The LIGER_PLANS rows of the contract architectures name classes and attributes that exist in this
    transformers (every row is tested on its own tiny model in am-kernels' test_liger_rows.py)."""
    from am_kernels import LIGER_PLANS
    from am_kernels.liger_modules import check_norm_math, norm_eps_attr

    arch_of = {"gemma3_text": "gemma3"}
    for model_type, plan in LIGER_PLANS.items():
        arch = arch_of.get(model_type, model_type)
        if arch not in ARCHS:
            continue
        model = _causal_lm(arch)
        assert model.config.model_type == model_type, (
            f"{arch} config has model_type {model.config.model_type}"
        )
        assert type(model).__name__ == plan.causal_lm_class
        by_class = {type(m).__name__: m for m in model.modules()}
        norm, mlp, attn = (by_class.get(c) for c in (plan.norm_class, plan.mlp_class, plan.attention_class))
        assert norm is not None and mlp is not None and attn is not None, (
            f"{model_type}: classes {sorted(by_class)}"
        )
        what = f"{model_type}: {plan.norm_class}"
        check_norm_math(norm, norm_eps_attr(norm, what), plan.norm_offset, what)
        assert len(inspect.signature(norm.forward).parameters) == 1, (
            f"{plan.norm_class}.forward takes one input"
        )
        assert all(
            isinstance(getattr(mlp, p, None), torch.nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")
        )
        assert getattr(model.config, plan.mlp_act_attr) in plan.mlp_acts, f"{model_type}: {plan.mlp_act_attr}"
        # The rope contract patch_liger_kernel checks (decorator chain, rope signature, behaviour probe).
        from am_kernels.liger_rope import checked_rope_target

        checked_rope_target(attn, plan)
        assert getattr(model, model.base_model_prefix, None) is model.model


def probe_loss_function_property() -> None:
    """`loss_function` reads the instance's `_loss_function` first (the Liger cross_entropy override)."""
    assert isinstance(vars(modeling_utils.PreTrainedModel).get("loss_function"), property)
    model = _causal_lm("llama")

    def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(0.0)

    model._loss_function = loss
    assert model.loss_function is loss, "PreTrainedModel.loss_function ignores an instance _loss_function"


def probe_outputs_and_fp32_flags() -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = set(CausalLMOutputWithPast.__dataclass_fields__)
    want = {"loss", "logits", "hidden_states", "attentions"}
    assert want <= fields, f"CausalLMOutputWithPast fields {sorted(fields)}"
    # The cache field under exactly one of its spellings (5.24 renamed past_key_values to cache).
    cache = [n for n in RENAMED_PARAMETERS["past_key_values"] if n in fields]
    assert len(cache) == 1, f"expected one of {RENAMED_PARAMETERS['past_key_values']} in {sorted(fields)}"
    for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
        assert hasattr(modeling_utils.PreTrainedModel, attr), f"PreTrainedModel.{attr} is gone"


def probe_rope_parameters() -> None:
    from am_precision import get_rope_config

    theta, params, factor = get_rope_config(_config("llama"))
    assert theta == 10000.0 and params["rope_type"] == "default" and factor == 1.0
    gemma = _config("gemma3").rope_parameters
    assert {"sliding_attention", "full_attention"} <= set(gemma), f"gemma3 rope_parameters {gemma}"


def probe_gemma4_versions() -> None:
    """Gemma4 exists from 5.5; its layer takes (hidden, per_layer_input, shared_kv_states=...)."""
    spec = importlib.util.find_spec("transformers.models.gemma4")
    if spec is None:  # older minors (5.3, 5.4) ship no Gemma4; its tests skip with the reason
        return
    layer = inspect.signature(importlib.import_module("transformers.models.gemma4.modeling_gemma4")
                              .Gemma4TextDecoderLayer.forward)  # fmt: skip
    names = list(layer.parameters)
    assert names[:3] == ["self", "hidden_states", "per_layer_input"] and "shared_kv_states" in names, names


def probe_torch_sdpa_backends() -> None:
    from torch.nn.attention import SDPBackend

    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        assert isinstance(getattr(SDPBackend, name, None), SDPBackend), f"SDPBackend.{name}"
    assert callable(torch.compiler.is_compiling)


@dataclass(frozen=True)
class Probe:
    what: str
    packages: str
    run: Callable[[], None]


PROBES: list[Probe] = [
    Probe("masking_utils.create_causal_mask(and_mask_function=)", "am-packing", probe_causal_mask_and_function),
    Probe("masking_utils.create_sliding_window_causal_mask(and_mask_function=)", "am-packing",
          probe_sliding_mask_and_function),
    Probe("masking_utils.and_masks", "am-packing", probe_and_masks),
    Probe("modeling_flash_attention_utils._get_unpad_data", "am-packing", probe_get_unpad_data),
    Probe("modeling_flash_attention_utils._upad_input global lookup", "am-packing", probe_unpad_is_module_global),
    Probe("models.*.modeling_*.create_causal_mask copies", "am-packing", probe_modeling_module_copies),
    Probe("AttentionInterface/AttentionMaskInterface._global_mapping", "am-attention, am-packing", probe_registries),
    Probe("_global_mapping dispatch via config._attn_implementation", "am-attention, am-packing",
          probe_registry_dispatch),
    Probe("PreTrainedConfig._attn_implementation_internal", "am-attention (inject_te_attention)",
          probe_config_attn_internal),
    Probe("PreTrainedModel._supports_flash_attn", "am-attention (flash flag bridge)", probe_supports_flash_attn),
    Probe("PreTrainedModel flash-attention dispatch flag", "am-attention (flash flag bridge)",
          probe_flash_dispatch_flag),
    Probe("models.*.<Arch>Attention dispatch + attributes", "am-attention (te)", probe_attention_dispatch),
    Probe("models.*.repeat_kv layout", "am-attention (te)", probe_repeat_kv_layout),
    Probe("models.*.apply_rotary_pos_emb", "am-kernels (liger rope)", probe_apply_rotary),
    Probe("decoder layer / rotary / mask call convention", "am-pipelining", probe_layer_call_convention),
    Probe("cache_position in mask builders and layers", "am-pipelining, am-packing", probe_cache_position_versions),
    Probe("<Arch>RotaryEmbedding(config) constructor", "am-pipelining (init_hf_model_buffers)",
          probe_rotary_constructor),
    Probe("LIGER_PLANS class layouts", "am-kernels (patch_liger_kernel)", probe_liger_layouts),
    Probe("PreTrainedModel.loss_function reads _loss_function", "am-kernels (liger cross_entropy)",
          probe_loss_function_property),
    Probe("CausalLMOutputWithPast / _keep_in_fp32_modules(_strict)", "am-precision, am-kernels",
          probe_outputs_and_fp32_flags),
    Probe("PreTrainedConfig.rope_parameters", "am-precision (get_rope_config)", probe_rope_parameters),
    Probe("models.gemma4 (Gemma4TextDecoderLayer.forward)", "am-pipelining", probe_gemma4_versions),
    Probe("torch.nn.attention.SDPBackend / torch.compiler", "am-kernels, am-attention", probe_torch_sdpa_backends),
]  # fmt: skip


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.run.__name__.removeprefix("probe_"))
def test_behaviour(probe: Probe) -> None:
    with _contract(probe.what, probe.packages):
        probe.run()


# --------------------------------------------------------------------------- no leaks
def _global_state() -> dict[str, Any]:
    pairs = {
        "AttentionInterface": modeling_utils.AttentionInterface._global_mapping,
        "AttentionMaskInterface": masking_utils.AttentionMaskInterface._global_mapping,
    }
    state: dict[str, Any] = {f"{k}[{key}]": v for k, m in pairs.items() for key, v in m.items()}
    state["PreTrainedModel._supports_flash_attn"] = vars(modeling_utils.PreTrainedModel)[
        "_supports_flash_attn"
    ]
    state["_get_unpad_data"] = flash_utils._get_unpad_data
    for name, module in list(sys.modules.items()):
        if name == "transformers.masking_utils" or (
            name.startswith("transformers.models.") and module is not None
        ):
            for builder in ("create_causal_mask", "create_sliding_window_causal_mask"):
                if builder in vars(module):
                    state[f"{name}.{builder}"] = vars(module)[builder]
    return state


@pytest.fixture(autouse=True)
def _no_leaked_patches() -> Iterator[None]:
    before = _global_state()
    yield
    after = _global_state()
    changed = [k for k in before if after.get(k) is not before[k]]
    # Modules imported during the test add entries; only ours (marked) or new registry keys are leaks.
    changed += [
        k for k in after.keys() - before.keys() if "Interface[" in k or hasattr(after[k], "__am_patch__")
    ]
    assert not changed, f"test leaked patches into {changed} (transformers {transformers.__version__})"


# --------------------------------------------------------------------------- patchers: apply, revert, identity
def _snapshot(*objs: Any) -> list[tuple[str, dict[str, Any]]]:
    """Shallow copies of every module's/config's own dict and its parameter/buffer/submodule tables."""
    out = []
    for obj in objs:
        items = obj.named_modules() if isinstance(obj, torch.nn.Module) else [(type(obj).__name__, obj)]
        for name, item in items:
            out.append((f"{name}.__dict__", dict(vars(item))))
            for table in ("_modules", "_parameters", "_buffers"):
                if isinstance(vars(item).get(table), dict):
                    out.append((f"{name}.{table}", dict(vars(item)[table])))
    return out


def _assert_restored(before: list, after: list, what: str) -> None:
    assert [n for n, _ in before] == [n for n, _ in after], f"{what}: the module tree changed"
    for (name, old), (_, new) in zip(before, after):
        assert old.keys() == new.keys(), f"{what}: {name} keys differ: {sorted(old.keys() ^ new.keys())}"
        changed = [k for k in old if old[k] is not new[k]]
        assert not changed, f"{what}: {name} entries {changed} are not the original objects"


def patcher_configure_packing() -> None:
    from am_packing import configure_packing, create_causal_mask, unconfigure_packing

    llama = _modeling("llama")
    model = _causal_lm("llama")
    originals = (masking_utils.create_causal_mask, masking_utils.create_sliding_window_causal_mask,
                 llama.create_causal_mask, flash_utils._get_unpad_data)  # fmt: skip
    # Packed batch (2 documents + padding) vs each document alone: same logits through sdpa.
    ids = _ids(1, 8)
    docs = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])
    handle = configure_packing("sdpa")
    try:
        assert (
            masking_utils.create_causal_mask is create_causal_mask
            and llama.create_causal_mask is create_causal_mask
        )
        assert flash_utils._get_unpad_data is not originals[3]
        packed = _logits(
            model, ids, attention_mask=docs, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
        )
    finally:
        unconfigure_packing()
    assert not handle.applied
    for doc, (lo, hi) in ((1, (0, 3)), (2, (3, 7))):
        alone = _logits(model, ids[:, lo:hi])
        torch.testing.assert_close(packed[:, lo:hi], alone, msg=f"document {doc} packed vs alone")
    restored = (masking_utils.create_causal_mask, masking_utils.create_sliding_window_causal_mask,
                llama.create_causal_mask, flash_utils._get_unpad_data)  # fmt: skip
    assert all(a is b for a, b in zip(originals, restored)), (
        "configure_packing's undo did not restore identity"
    )


def patcher_register_varlen_attention() -> None:
    from am_packing import VARLEN_ATTN_IMPLEMENTATION, register_varlen_attention, unregister_varlen_attention

    before = _global_state()
    handle = register_varlen_attention()
    try:
        assert VARLEN_ATTN_IMPLEMENTATION in modeling_utils.ALL_ATTENTION_FUNCTIONS
        assert VARLEN_ATTN_IMPLEMENTATION in masking_utils.AttentionMaskInterface._global_mapping
        assert register_varlen_attention() is handle, "not idempotent"
    finally:
        unregister_varlen_attention()
    assert VARLEN_ATTN_IMPLEMENTATION not in modeling_utils.AttentionInterface._global_mapping
    assert _global_state().keys() == before.keys()


def patcher_inject_te_attention() -> None:
    from am_attention import (
        ReferenceDotProductAttention,
        get_te_attention_stats,
        inject_te_attention,
        remove_te_attention,
        reset_te_attention_stats,
    )

    model = _causal_lm("llama")
    ids = _ids()
    reference = _logits(model, ids)
    before = _snapshot(model, model.config)
    reset_te_attention_stats()
    handle = inject_te_attention(model, dot_product_attention_cls=ReferenceDotProductAttention)
    try:
        assert handle.taken, "no attention module was injected"
        assert model.config._attn_implementation == "te"
        got = _logits(model, ids)
        assert get_te_attention_stats()["te_hits"] == 2, get_te_attention_stats()
    finally:
        assert remove_te_attention(model)
        reset_te_attention_stats()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    _assert_restored(before, _snapshot(model, model.config), "remove_te_attention")


def patcher_register_te_attention_backend() -> None:
    from am_attention import (
        TE_ATTN_IMPLEMENTATION,
        register_te_attention_backend,
        unregister_te_attention_backend,
    )

    handle = register_te_attention_backend()
    try:
        assert modeling_utils.ALL_ATTENTION_FUNCTIONS[TE_ATTN_IMPLEMENTATION] is not None
        assert register_te_attention_backend() is handle
    finally:
        unregister_te_attention_backend()
    assert TE_ATTN_IMPLEMENTATION not in masking_utils.AttentionMaskInterface._global_mapping


def patcher_legacy_flash_attn_flag() -> None:
    from am_attention import patch_legacy_flash_attn_flag, unpatch_legacy_flash_attn_flag

    original = vars(modeling_utils.PreTrainedModel)["_supports_flash_attn"]
    model = _LegacyFlagModel(transformers.PretrainedConfig())
    handle = patch_legacy_flash_attn_flag()
    try:
        assert _flash_dispatch_sees_support(model), "the bridged legacy flag is not seen by the FA check"
        assert _modeling("llama").LlamaPreTrainedModel._supports_flash_attn is True
        assert patch_legacy_flash_attn_flag() is handle
    finally:
        unpatch_legacy_flash_attn_flag()
    assert vars(modeling_utils.PreTrainedModel)["_supports_flash_attn"] is original
    assert _flash_dispatch_sees_support(model) is _legacy_flash_check()


def patcher_patch_hf_model_for_pp() -> None:
    from am_pipelining import patch_hf_model_for_pp, unpatch_hf_model_for_pp

    model = _causal_lm("llama")
    ids = _ids()
    reference = _logits(model, ids)
    before = _snapshot(model)
    patch_hf_model_for_pp(model)
    try:
        assert "forward" in vars(model) and "forward" in vars(model.model)
        with torch.no_grad():
            got = model(ids)
        assert isinstance(got, torch.Tensor), f"pipeline forward returned {type(got)}"
    finally:
        unpatch_hf_model_for_pp(model)
    torch.testing.assert_close(got, reference)
    _assert_restored(before, _snapshot(model), "unpatch_hf_model_for_pp")


def patcher_liger_kernel() -> None:
    # Structure only: liger-kernel's Triton kernels need a GPU, so nothing is run through them here.
    from am_kernels import get_liger_kernel_patch, patch_liger_kernel, unpatch_liger_kernel

    model = _causal_lm("llama")
    before = _snapshot(model)
    patch_liger_kernel(model)
    try:
        handle = get_liger_kernel_patch(model)
        assert handle is not None and handle.model_type == "llama"
        layer = model.model.layers[0]
        for module in (layer.input_layernorm, layer.mlp, layer.self_attn, model):
            assert "forward" in vars(module), f"{type(module).__name__} forward not patched"
        assert inspect.signature(model.forward) == inspect.signature(type(model).forward.__get__(model))
    finally:
        unpatch_liger_kernel(model)
    _assert_restored(before, _snapshot(model), "unpatch_liger_kernel")


def patcher_sdpa_backends() -> None:
    from torch.nn.attention import SDPBackend

    from am_kernels import patch_sdpa_backends, unpatch_sdpa_backends

    model = _causal_lm("llama")
    ids = _ids()
    reference = _logits(model, ids)
    attn = model.model.layers[0].self_attn
    before = _snapshot(model)
    signature = inspect.signature(attn.forward)
    patch_sdpa_backends(attn, [SDPBackend.MATH])
    try:
        assert "forward" in vars(attn) and inspect.signature(attn.forward) == signature
        got = _logits(model, ids)
    finally:
        unpatch_sdpa_backends(attn)
    torch.testing.assert_close(got, reference)
    _assert_restored(before, _snapshot(model), "unpatch_sdpa_backends")


def patcher_te_modules() -> None:
    import am_precision

    if not am_precision.HAVE_TE:
        pytest.skip(
            "am_precision.patch_te_modules patches transformer_engine.pytorch, which is not installed"
        )
    import transformer_engine.pytorch as te

    originals = {
        name: vars(getattr(te, name)).get("forward") for name in ("Linear", "GroupedLinear", "RMSNorm")
    }
    am_precision.patch_te_modules()
    try:
        assert am_precision.patch_te_modules().applied
    finally:
        am_precision.unpatch_te_modules()
    for name, original in originals.items():
        assert vars(getattr(te, name)).get("forward") is original, f"te.{name}.forward not restored"


PATCHERS: list[Probe] = [
    Probe("am_packing.configure_packing / unconfigure_packing", "am-packing", patcher_configure_packing),
    Probe("am_packing.register_varlen_attention", "am-packing", patcher_register_varlen_attention),
    Probe(
        "am_attention.inject_te_attention / remove_te_attention", "am-attention", patcher_inject_te_attention
    ),
    Probe(
        "am_attention.register_te_attention_backend", "am-attention", patcher_register_te_attention_backend
    ),
    Probe("am_attention.patch_legacy_flash_attn_flag", "am-attention", patcher_legacy_flash_attn_flag),
    Probe("am_pipelining.patch_hf_model_for_pp", "am-pipelining", patcher_patch_hf_model_for_pp),
    Probe("am_kernels.patch_liger_kernel", "am-kernels", patcher_liger_kernel),
    Probe("am_kernels.patch_sdpa_backends", "am-kernels", patcher_sdpa_backends),
    Probe("am_precision.patch_te_modules", "am-precision", patcher_te_modules),
]


@pytest.mark.parametrize("patcher", PATCHERS, ids=lambda p: p.run.__name__.removeprefix("patcher_"))
def test_patcher_round_trip(patcher: Probe) -> None:
    with _contract(patcher.what, patcher.packages):
        patcher.run()
