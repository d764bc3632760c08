"""Tiny random-weight causal LMs for every entry of transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`.

Nothing here knows a model by name. Each architecture's default config class is instantiated, then every
config node (the top config and each nested sub-config: text, vision, audio, ...) is rebuilt through its own
class with its integer fields shrunk by what the field *is*:

- roles by field name (hidden width, per-head width, head counts, key/value head counts, experts, layer
  counts, vocabularies, windows, special token ids), with the relations between them preserved: a field that
  equalled the old hidden width gets the new one; heads x head width that equalled (a multiple of) the hidden
  width still does; other widths (intermediate, LoRA ranks, ...) scale with the hidden width;
- per-layer lists (``layer_types``, ``mlp_layer_types``, per-layer flags, ...) are cut *consistently*: the
  same layer indices are kept in every list, chosen so that each distinct per-layer combination of the
  original model survives (2 to 4 layers), and layer-index lists and layer-count thresholds
  (``max_window_layers``, ``first_k_dense_replace``, ...) are remapped onto the kept layers;
- sliding windows and attention chunks become 4 tokens, shorter than the probe documents, so they matter.

The builder then raises the initialisation scale a little (``initializer_range`` and the like) and randomises
norm weights, so that a wrong result shows up in fp32 logits well above the exactness tolerance (each check
also measures a control that must differ). Any failure to build is reported as ``TinyBuildError``: the
sweep records it as ``skip: <why>``.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
from collections.abc import Iterable
from typing import Any

import torch

VOCAB = 256
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
ROPE_HEAD_DIM = 8
EXPERTS = 4
TOP_K = 2
WINDOW = 4
MAX_LAYERS = 4
MIN_LAYERS = 2
MAX_POSITIONS = 4096
# Special ids above the new vocabulary are moved into its top SPECIAL_SLOTS; documents avoid them.
SPECIAL_SLOTS = 32
INIT_STD = 0.1


class TinyBuildError(Exception):
    """The architecture could not be shrunk/built into a tiny model (the sweep reports `skip`)."""


# ---------------------------------------------------------------------------------------------- roles

HIDDEN_NAMES = {
    "hidden_size",
    "d_model",
    "n_embd",
    "embedding_dim",
    "hidden_dim",
    "dim",
    "embed_dim",
    "emb_dim",
}
HEAD_COUNT_NAMES = {
    "num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
    "decoder_attention_heads", "attention_heads", "num_encoder_attention_heads",
    "num_decoder_attention_heads", "conf_num_attention_heads", "swa_num_attention_heads", "index_n_heads",
    "linear_num_value_heads", "linear_num_heads", "mamba_n_heads", "n_mamba_heads", "mamba_num_heads",
    "heads_per_ngram",
}  # fmt: skip
KV_HEAD_NAMES = {
    "num_key_value_heads", "n_kv_heads", "num_kv_heads", "swa_num_key_value_heads", "linear_num_key_heads",
    "num_query_groups", "multi_query_group_num", "n_groups", "mamba_n_groups",
}  # fmt: skip
EXPERT_NAMES = {
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
}  # fmt: skip
TOP_K_NAMES = {
    "num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k", "num_selected_experts",
}  # fmt: skip
ONE_NAMES = {
    "n_group",
    "topk_group",
    "num_expert_group",
    "n_shared_experts",
    "num_shared_experts",
    "o_groups",
}
WINDOW_NAMES = {
    "sliding_window", "sliding_window_size", "attention_window_size", "local_attention",
    "attention_chunk_size", "keep_window_size", "local_attention_window_len",
}  # fmt: skip
LAYER_COUNT_NAMES = {
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
    "num_decoder_layers", "num_encoder_layers", "depth", "num_blocks", "conf_num_hidden_layers",
}  # fmt: skip
# Fields counting (from the start) the layers that behave one way: remapped onto the kept layers.
LAYER_THRESHOLD_NAMES = {
    "max_window_layers", "first_k_dense_replace", "moe_layer_start_index", "moe_layer_end_index",
    "loop_layer_index_start", "loop_layer_index_end", "first_k_dense", "num_dense_layers",
}  # fmt: skip
# Fields counting layers from the end.
LAYER_TAIL_NAMES = {"num_kv_shared_layers"}
POSITION_NAMES = {
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
    "max_target_positions", "max_source_positions", "model_max_length", "original_max_position_embeddings",
}  # fmt: skip
# Integer fields that are not sizes to shrink (sizes of inputs we never feed, kernel shapes, seeds, ...).
KEEP_PATTERN = re.compile(
    r"image|patch|kernel|stride|bucket|distance|seed|rate|sample|crop|ratio|mel|chroma|hop|"
    r"conv_l_cache|divisible|multiple_of|max_inference|loops|cycles|pattern|period|offset|"
    r"sinkhorn|spatial|temporal|frame|quantizer|codebook|channel|num_labels|scalar|scale|floor|"
    r"merge|chunk|block_size|feature_size|in_channels|prompt_length|prompt_types|segment_types|n_top|"
    r"mask_time|mask_feature|median|tokens_per|soft_tokens|mm_tokens|seq_length|position|positions",
    re.IGNORECASE,
)
PLAIN_HEAD_DIMS = {
    "head_dim", "d_head", "d_kv", "kv_channels", "dim_head", "attention_head_size", "attention_head_dim",
    "mamba_d_head", "mamba_head_dim", "mamba_headdim",
}  # fmt: skip
DIM_PATTERN = re.compile(r"size|dim|width|rank|inner|ffn|d_ff|dff|hidden|channels|d_ssm", re.IGNORECASE)
TOKEN_ID_PATTERN = re.compile(r"(token_id|token_index|token_ids|_id|_index)$")
INIT_NAMES = ("initializer_range", "init_std")


def _round8(x: float, minimum: int = 8) -> int:
    return max(minimum, round(x / 8.0) * 8)


def _field_names(cls: type) -> set[str] | None:
    """Constructor keyword names of a config class (dataclass fields in 5.x, __init__ parameters before)."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _public_items(config: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ per-layer lists


def _layer_count(items: dict[str, Any]) -> tuple[str, int] | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "depth"):
        value = items.get(name)
        if _int(value) and value > 0:
            return name, value
    return None


def _per_layer_lists(items: dict[str, Any], n_layers: int) -> dict[str, list]:
    return {
        k: list(v)
        for k, v in items.items()
        if isinstance(v, (list, tuple)) and len(v) == n_layers and not _is_index_list(k, v, n_layers)
    }


def _is_index_list(name: str, value: Any, n_layers: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``full_attn_idxs``, ...), not one value per layer."""
    if not isinstance(value, (list, tuple)) or not value or not all(_int(v) for v in value):
        return False
    if not re.search(r"layers|idx|ids|indexes|indices", name):
        return False
    increasing = all(a < b for a, b in itertools.pairwise(value))
    return increasing and all(0 <= v < n_layers for v in value)


def choose_layers(per_layer: dict[str, list], n_layers: int) -> list[int]:
    """Indices of the layers to keep: first occurrence of each distinct per-layer combination (at most
    MAX_LAYERS of them), topped up with the earliest remaining layers to at least MIN_LAYERS."""
    keys = sorted(per_layer)
    chosen: list[int] = []
    seen: set[str] = set()
    for i in range(n_layers):
        signature = repr(tuple(per_layer[k][i] for k in keys))
        if signature not in seen and len(chosen) < MAX_LAYERS:
            seen.add(signature)
            chosen.append(i)
    for i in range(n_layers):
        if len(chosen) >= min(MIN_LAYERS, n_layers):
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- shrink


class _Shrinker:
    def __init__(self, scale_overrides: bool = True) -> None:
        self.scale_overrides = scale_overrides
        self.old_hidden: set[int] = set()
        self.old_vocab: set[int] = set()
        self.special: dict[int, int] = {}  # old special id -> new id
        self.kept_layers: dict[str, list[int]] = {}  # config path -> original indices of the kept layers
        self.notes: list[str] = []

    # ids -------------------------------------------------------------------------------------------
    def token_id(self, value: int) -> int:
        if value < VOCAB - SPECIAL_SLOTS:
            return value
        if value not in self.special:
            if len(self.special) >= SPECIAL_SLOTS:
                raise TinyBuildError(f"more than {SPECIAL_SLOTS} distinct special token ids")
            self.special[value] = VOCAB - 1 - len(self.special)
        return self.special[value]

    # one config node --------------------------------------------------------------------------------
    def collect(self, config: Any) -> None:
        """Every hidden width and vocabulary of the tree, before any node is shrunk (cross-node relations)."""
        for key, value in _public_items(config).items():
            if _is_config(value):
                self.collect(value)
            elif key in HIDDEN_NAMES and _int(value) and value > 0:
                self.old_hidden.add(value)

    def shrink(self, config: Any, parent_hidden: int | None = None, path: str = "config") -> Any:
        cls = type(config)
        items = _public_items(config)
        fields = _field_names(cls)
        hidden = next((items[n] for n in HIDDEN_NAMES if _int(items.get(n)) and items[n] > 0), None)
        ref_hidden = hidden or parent_hidden
        new: dict[str, Any] = {}

        # sub-configs first (each is shrunk through its own class)
        for key, value in items.items():
            if _is_config(value):
                new[key] = self.shrink(value, ref_hidden, f"{path}.{key}")

        # heterogeneous configs (transformers >= 5.24): per-layer overrides of global fields
        spec = vars(config).get("_heterogeneity_spec")
        overrides = dict(getattr(spec, "per_layer_overrides", None) or {})
        self.shrink_layers(items, new, path, overrides)

        if hidden is not None:
            for key in HIDDEN_NAMES & items.keys():
                if _int(items[key]) and items[key] == hidden:
                    new[key] = HIDDEN

        heads = next((items[n] for n in ("num_attention_heads", "n_head", "num_heads", "n_heads",
                                          "decoder_attention_heads") if _int(items.get(n))), None)  # fmt: skip
        # per-head widths: equal widths stay equal (MLA: head_dim == qk_rope_head_dim), rope slices first
        head_dims = [k for k, v in items.items() if _int(v) and v > 0 and _is_head_dim(k)]
        width_map: dict[int, int] = {}
        for key in sorted(head_dims, key=lambda k: "rope" not in k.lower()):
            value = items[key]
            if value not in width_map:
                width_map[value] = ROPE_HEAD_DIM if "rope" in key.lower() else HEAD_DIM
            new[key] = width_map[value]
        has_experts = any(_int(items.get(k)) and items[k] > 0 for k in EXPERT_NAMES) or _int(
            items.get("moe_intermediate_size")
        )
        for key, value in items.items():
            if key in new:
                continue
            if value is None:
                # Incomplete defaults that the modeling code needs (seen: head_dim, key/value heads,
                # experts per token left None while experts are configured).
                if key == "head_dim" and heads:
                    new[key] = HEAD_DIM
                elif key in ("num_key_value_heads", "num_kv_heads") and heads:
                    new[key] = HEADS
                elif key in TOP_K_NAMES and has_experts:
                    new[key] = TOP_K
                elif key in EXPERT_NAMES and _int(items.get("moe_intermediate_size")):
                    new[key] = EXPERTS
                elif key in ONE_NAMES and key.endswith("experts") and has_experts:
                    new[key] = 1
                continue
            if not _int(value) or value <= 0:
                continue
            lower = key.lower()
            if key in HEAD_COUNT_NAMES:
                new[key] = HEADS
            elif key in KV_HEAD_NAMES:
                partner = heads if key != "swa_num_key_value_heads" else items.get("swa_num_attention_heads")
                if partner is not None and value == partner:
                    new[key] = HEADS
                elif value == 1:
                    new[key] = 1
                else:
                    new[key] = 2
            elif key in EXPERT_NAMES:
                new[key] = min(value, EXPERTS)
            elif key in TOP_K_NAMES:
                new[key] = min(value, TOP_K)
            elif key in ONE_NAMES:
                new[key] = 1
            elif key in WINDOW_NAMES:
                new[key] = min(value, WINDOW)
            elif key.startswith("n_layers_per_"):
                new[key] = 1  # block sizes that layer-index thresholds must be multiples of
            elif key == "zero_expert_num":
                new[key] = min(value, 2)
            elif "vocab" in lower and "divisible" not in lower:
                new[key] = VOCAB
            elif _is_token_id(key) or key in POSITION_NAMES:
                pass  # token ids after the vocabulary, positions below (all together)
            elif KEEP_PATTERN.search(key):
                continue
            elif ref_hidden and value in self.old_hidden:
                new[key] = HIDDEN
            elif ref_hidden and DIM_PATTERN.search(key):
                new[key] = _round8(value * HIDDEN / ref_hidden)
        # int tuples that split the hidden width (axial position embedding dims): same split of the new one
        for key, value in items.items():
            if key in new or not hidden or not isinstance(value, (list, tuple)) or len(value) < 2:
                continue
            if (
                all(_int(v) and v > 0 for v in value)
                and sum(value) == hidden
                and not KEEP_PATTERN.search(key)
            ):
                parts = [max(1, v * HIDDEN // hidden) for v in value]
                parts[-1] += HIDDEN - sum(parts)
                new[key] = type(value)(parts)
        # per-layer head counts (one entry per layer)
        for key, value in list(new.items()):
            if "heads" in key and isinstance(value, (list, tuple)) and value and all(_int(v) for v in value):
                new[key] = type(value)(HEADS for _ in value)
        _keep_sums(items, new)
        self.keep_products(items, new, hidden)
        # kv-like groups must divide their head count
        for key in KV_HEAD_NAMES & new.keys():
            for count in HEAD_COUNT_NAMES & new.keys():
                if _int(new[key]) and _int(new[count]) and new[count] % new[key]:
                    new[key] = math.gcd(new[count], new[key])
        # positions: one common factor so that their ratios (rope scaling) hold
        positions = {k: items[k] for k in POSITION_NAMES & items.keys() if _int(items[k]) and items[k] > 0}
        if positions and max(positions.values()) > MAX_POSITIONS:
            factor = max(positions.values()) / MAX_POSITIONS
            for key, value in positions.items():
                new[key] = max(64, int(value / factor))
        rope = items.get("rope_parameters") or items.get("rope_scaling")
        if isinstance(rope, dict):
            rope_key = "rope_parameters" if "rope_parameters" in items else "rope_scaling"
            new[rope_key] = self.shrink_rope(rope, positions, new)
        if overrides and path in self.kept_layers:
            new["per_layer_config"] = self.shrink_overrides(
                overrides, self.kept_layers[path], items, new, scale=self.scale_overrides
            )
        # a causal LM is a decoder: BERT-style configs attend bidirectionally unless told otherwise
        if path == "config" and items.get("is_decoder") is False:
            new["is_decoder"] = True
        # a model that needs a default input language gets the first one it declares
        if "default_language" in items and items["default_language"] is None:
            languages = items.get("languages")
            if isinstance(languages, (list, tuple)) and languages:
                new["default_language"] = languages[0]
        return self.rebuild(config, cls, fields, items, new, path)

    def shrink_layers(self, items: dict[str, Any], new: dict[str, Any], path: str, overrides: dict) -> None:
        layers = _layer_count(items)
        if layers is not None:
            _, n_layers = layers
            per_layer = _per_layer_lists(items, n_layers)
            # layer segments that add up to the depth (input / recurrent / output blocks): one layer each
            segments = {
                k: v
                for k, v in items.items()
                if re.fullmatch(r"(n|num)_\w+_layers", k) and _int(v) and k not in LAYER_COUNT_NAMES
            }
            if len(segments) > 1 and sum(segments.values()) == n_layers:
                kept, start = [], 0
                for key, count in segments.items():
                    kept.append(start)
                    new[key] = 1
                    start += count
            else:
                # what tells layers apart: per-layer lists, and layer-count thresholds / periods
                features = dict(per_layer)
                for key in LAYER_THRESHOLD_NAMES & items.keys():
                    if _int(items[key]):
                        features[f"<{key}"] = [i < items[key] for i in range(n_layers)]
                for key in LAYER_TAIL_NAMES & items.keys():
                    if _int(items[key]):
                        features[f">{key}"] = [i >= n_layers - items[key] for i in range(n_layers)]
                for period, offset in _periods(items):
                    features[f"%{period}"] = [
                        i % items[period] == items[offset] % items[period] for i in range(n_layers)
                    ]
                if overrides:
                    features["@per_layer_config"] = [
                        repr(sorted(overrides.get(i, {}).items())) for i in range(n_layers)
                    ]
                kept = choose_layers(features, n_layers)
            self.kept_layers[path] = kept
            for key in LAYER_COUNT_NAMES & items.keys():
                if _int(items[key]) and items[key] == n_layers:
                    new[key] = len(kept)
            for key, value in per_layer.items():
                new[key] = type(items[key])(value[i] for i in kept)
            for key, value in items.items():
                if _is_index_list(key, value, n_layers):
                    new[key] = type(value)(kept.index(i) for i in value if i in kept)
                elif _is_repeated_pattern(value) and len(value[0][0]) * value[0][1] == n_layers:
                    # [[pattern, repeats]] (GPT-Neo attention_types): repeats cover the kept depth
                    pattern = list(value[0][0])
                    new[key] = [[pattern, max(1, len(kept) // len(pattern))]]
                    for count_key in LAYER_COUNT_NAMES & items.keys():
                        if count_key in new:
                            new[count_key] = len(pattern) * new[key][0][1]
            for key in LAYER_THRESHOLD_NAMES & items.keys():
                if _int(items[key]):
                    new[key] = sum(1 for i in kept if i < items[key])
            for period, offset in _periods(items):
                # "layer i is special when i % period == offset": period 2, one layer of each kind
                if items[period] > 1:
                    new[period] = 2
                    new[offset] = 1 if items[offset] % items[period] else 0
            for key in LAYER_TAIL_NAMES & items.keys():
                if _int(items[key]):
                    new[key] = sum(1 for i in kept if i >= n_layers - items[key])
        for key in LAYER_COUNT_NAMES & items.keys():
            if key not in new and _int(items[key]) and items[key] > MIN_LAYERS:
                new[key] = MIN_LAYERS

    @staticmethod
    def shrink_overrides(
        overrides: dict, kept: list[int], items: dict[str, Any], new: dict[str, Any], scale: bool = True
    ) -> dict:
        """Per-layer overrides of the kept layers, re-indexed; an integer override scales like its global
        field did (Gemma4's full-attention head_dim 512 vs 256 stays twice the tiny head_dim)."""
        shrunk: dict[int, dict[str, Any]] = {}
        for new_index, old_index in enumerate(kept):
            layer = {}
            for key, value in (overrides.get(old_index) or {}).items():
                glob, tiny_glob = items.get(key), new.get(key, items.get(key))
                if scale and _int(value) and _int(glob) and _int(tiny_glob) and glob > 0:
                    value = max(1, round(value * tiny_glob / glob))
                layer[key] = value
            if scale:
                # sums that held in this layer's effective config still hold
                old_eff = {**items, **(overrides.get(old_index) or {})}
                new_eff = {**items, **new, **layer}
                for total, parts in SUM_RELATIONS:
                    if total in old_eff and _keeps_sum(old_eff, total, parts):
                        value = sum(new_eff[p] for p in parts)
                        if value != new_eff.get(total):
                            layer[total] = value
            if layer:
                shrunk[new_index] = layer
        return shrunk

    def keep_products(self, items: dict[str, Any], new: dict[str, Any], hidden: int | None) -> None:
        """A head count whose product with a per-head width of the same family (``mamba_n_heads`` and
        ``mamba_d_head``) equalled a width of the node (the hidden size, a multiple of it, an SSM inner
        width) is recomputed so the product still holds. Plain attention heads x head_dim = hidden already
        holds for the targets (4 x 16 = 64)."""
        widths: list[tuple[int, int]] = [(hidden * m, HIDDEN * m) for m in (1, 2, 3, 4)] if hidden else []
        for key, value in items.items():
            if (
                key in new
                and _int(value)
                and _int(new[key])
                and DIM_PATTERN.search(key)
                and not _is_head_dim(key)
            ):
                widths.append((value, new[key]))
        hidden_multiples = [(hidden * m, HIDDEN * m) for m in (1, 2, 3, 4)] if hidden else []
        for count in (HEAD_COUNT_NAMES | KV_HEAD_NAMES) & new.keys():
            if not _int(items.get(count)):
                continue
            family = _family(count)
            dims = [k for k in items if _is_head_dim(k) and k in new and _int(items[k])]
            # same family: any width of the node; otherwise (heads x head_dim) only multiples of hidden
            candidates = [(k, widths) for k in dims if family is not None and _family(k) == family]
            if count in HEAD_COUNT_NAMES:
                candidates += [(k, hidden_multiples) for k in dims if k in PLAIN_HEAD_DIMS]
            for dim_key, allowed in candidates:
                product = items[count] * items[dim_key]
                match = next((w_new for w_old, w_new in allowed if w_old == product), None)
                if match is not None and match % new[dim_key] == 0 and match // new[dim_key] >= 1:
                    new[count] = match // new[dim_key]
                    break

    def shrink_rope(self, rope: dict, positions: dict[str, int], new: dict[str, Any]) -> dict:
        rope = dict(rope)
        if "mrope_section" in rope and isinstance(rope["mrope_section"], (list, tuple)):
            section = list(rope["mrope_section"])
            half = (new.get("head_dim") or HEAD_DIM) // 2
            total = sum(section)
            scaled = [max(1, s * half // total) for s in section]
            scaled[0] += half - sum(scaled)
            rope["mrope_section"] = scaled
        omax = rope.get("original_max_position_embeddings")
        if _int(omax) and positions and max(positions.values()) > MAX_POSITIONS:
            factor = max(positions.values()) / MAX_POSITIONS
            rope["original_max_position_embeddings"] = max(64, int(omax / factor))
        return rope

    def rebuild(
        self, config: Any, cls: type, fields: set[str] | None, items: dict, new: dict, path: str
    ) -> Any:
        # token ids last: they depend on the new vocabulary
        for key, value in items.items():
            if not _is_token_id(key):
                continue
            if _int(value):
                new[key] = self.token_id(value)
            elif isinstance(value, (list, tuple)) and value and all(_int(v) for v in value):
                new[key] = type(value)(self.token_id(v) for v in value)
        for key in INIT_NAMES:
            if isinstance(items.get(key), float) and 0 < items[key] < INIT_STD:
                new[key] = INIT_STD
        if "tie_word_embeddings" in items or (fields and "tie_word_embeddings" in fields):
            # am-pipelining needs untied embeddings (first stage owns embed_tokens, last owns lm_head);
            # untied is also what every other check is indifferent to.
            new["tie_word_embeddings"] = False
        # The default instance was built from the class defaults, so passing only the changed fields gives
        # the same config with new sizes; fields derived in post-init (``layer_types`` from
        # ``num_hidden_layers``, ``head_dim`` from the widths) are derived again from the new sizes.
        kwargs = {k: v for k, v in new.items() if fields is None or k in fields or k == "per_layer_config"}
        late = {k: v for k, v in new.items() if k not in kwargs}
        try:
            rebuilt = cls(**kwargs)
        except Exception as exc:  # any validator error means "cannot build this shape"
            raise TinyBuildError(
                f"{path} ({cls.__name__}) rejects the shrunk sizes: {_first_line(exc)}"
            ) from exc
        # Attributes a parent config set on this one after construction (not fields) are carried over.
        for key, value in vars(config).items():
            if not key.startswith("_") and key not in vars(rebuilt) and key not in new:
                try:
                    setattr(rebuilt, key, value)
                except Exception:
                    pass
        for key, value in late.items():
            if getattr(rebuilt, key, None) != value and key in vars(config):
                try:
                    setattr(rebuilt, key, value)
                except Exception as exc:
                    raise TinyBuildError(f"{path}.{key}={value!r} rejected: {_first_line(exc)}") from exc
        return rebuilt


def _is_head_dim(key: str) -> bool:
    return key.lower().endswith(("head_dim", "headdim")) or key in {
        "kv_channels", "d_kv", "d_head", "attention_head_size", "dim_head", "mamba_d_head", "attention_head_dim",
    }  # fmt: skip


def _periods(items: dict[str, Any]) -> list[tuple[str, str]]:
    """(``x_period``, ``x_offset``) field pairs: layer i is of kind x when i % period == offset."""
    pairs = []
    for key, value in items.items():
        if key.endswith("_period") and _int(value) and value > 0:
            offset = key[: -len("_period")] + "_offset"
            if _int(items.get(offset)):
                pairs.append((key, offset))
    return pairs


def _family(key: str) -> str | None:
    """Name prefix shared by fields of one sub-module (``mamba_``, ``linear_``, ``swa_``), if any."""
    head = key.split("_")[0]
    return None if head in {"num", "n", "head", "attention", "kv", "d", "qk", "v"} else head


def _is_token_id(key: str) -> bool:
    return bool(TOKEN_ID_PATTERN.search(key)) and ("token" in key.lower() or key == "mask_index")


def _is_repeated_pattern(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 1
        and isinstance(value[0], (list, tuple))
        and len(value[0]) == 2
        and isinstance(value[0][0], (list, tuple))
        and _int(value[0][1])
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next(
        (ln.strip() for ln in text.splitlines() if ln.strip() and "validation error" not in ln.lower()), ""
    )
    return f"{type(exc).__name__}: {line or text[:200]}"[:300]


# ------------------------------------------------------------------------------------------- building


def causal_lm_architectures() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causal_lm_class(arch: str) -> type:
    import transformers

    name = causal_lm_architectures()[arch]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise TinyBuildError(f"transformers has no class {name} (listed for {arch})")
    return cls


def tiny_config(arch: str) -> tuple[Any, dict[str, Any]]:
    """The shrunk config of `arch` and what was done (special-id remap) for the report.

    The config class is the causal-LM class's own ``config_class`` (for a composite model type such as
    musicgen, the mapping's class is the decoder alone), else ``CONFIG_MAPPING[arch]``.
    """
    from transformers import CONFIG_MAPPING, PretrainedConfig

    model_cls = causal_lm_class(arch)
    config_cls = getattr(model_cls, "config_class", None)
    if (
        not (isinstance(config_cls, type) and issubclass(config_cls, PretrainedConfig))
        or config_cls is PretrainedConfig
    ):
        config_cls = CONFIG_MAPPING[arch]
    try:
        default = config_cls()
    except Exception as exc:
        raise TinyBuildError(
            f"the default {config_cls.__name__} cannot be built: {_first_line(exc)}"
        ) from exc
    # A config whose per-layer overrides are tied by relations we do not know (Dots3Note: a layer's
    # head_dim = its qk_nope + qk_rope) is retried with the overrides re-indexed but not scaled.
    for scale_overrides in (True, False):
        shrinker = _Shrinker(scale_overrides=scale_overrides)
        shrinker.collect(default)
        try:
            config = shrinker.shrink(default)
            break
        except TinyBuildError:
            if not scale_overrides or not _has_overrides(default):
                raise
    info = {
        "config_class": config_cls.__name__,
        "kept_layers": shrinker.kept_layers,
        "special_ids": shrinker.special,
    }
    return config, info


# MLA: the query/key head is the no-rope part plus the rope part
SUM_RELATIONS = (
    ("qk_head_dim", ("qk_nope_head_dim", "qk_rope_head_dim")),
    ("head_dim", ("qk_nope_head_dim", "qk_rope_head_dim")),
)


def _keeps_sum(values: dict[str, Any], total: str, parts: tuple[str, ...]) -> bool:
    return (
        _int(values.get(total))
        and all(_int(values.get(p)) for p in parts)
        and values[total] == sum(values[p] for p in parts)
    )


def _keep_sums(items: dict[str, Any], new: dict[str, Any]) -> None:
    for total, parts in SUM_RELATIONS:
        if _keeps_sum(items, total, parts):
            new[total] = sum(new.get(p, items[p]) for p in parts)


def _has_overrides(config: Any) -> bool:
    if vars(config).get("_heterogeneity_spec") is not None:
        return True
    return any(_has_overrides(v) for v in _public_items(config).values() if _is_config(v))


def special_ids(config: Any) -> set[int]:
    """Every token id named anywhere in the config tree (documents avoid them)."""
    found: set[int] = set()

    def walk(node: Any) -> None:
        for key, value in _public_items(node).items():
            if _is_config(value):
                walk(value)
            elif TOKEN_ID_PATTERN.search(key) and ("token" in key.lower() or key == "mask_index"):
                if _int(value):
                    found.add(value)
                elif isinstance(value, (list, tuple)):
                    found.update(v for v in value if _int(v))
            elif key in {"padding_idx", "pad_idx"} and _int(value):
                found.add(value)

    walk(config)
    return found


def text_vocab(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or VOCAB)


def build_model(arch: str, config: Any, attn_implementation: str | None, seed: int = 0) -> torch.nn.Module:
    """Random-weight fp32 model of the causal-LM class of `arch`, eval mode; norm weights randomised (see
    module docstring)."""
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = causal_lm_class(arch)._from_config(config, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for pname, param in module.named_parameters(recurse=False):
                    if pname == "weight" and param.dim() == 1 and param.is_floating_point():
                        noise = torch.randn(param.shape, generator=generator) * 0.3
                        param.add_(noise.to(param.dtype))
    return model.eval()


def documents(config: Any, lengths: Iterable[int], seed: int = 0) -> list[torch.Tensor]:
    """Random token documents avoiding every special id of the config (and the reserved top slots)."""
    vocab = text_vocab(config)
    avoid = special_ids(config)
    allowed = torch.tensor([t for t in range(3, max(4, vocab - SPECIAL_SLOTS)) if t not in avoid])
    generator = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(0, len(allowed), (n,), generator=generator)] for n in lengths]
