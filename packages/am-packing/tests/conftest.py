"""Shared fixtures: tiny models from configs, a leak detector for every patch we make."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

torch.set_num_threads(1)

BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def _snapshot() -> dict:
    import transformers
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as flash_utils

    snap = {
        "masking": {name: vars(masking)[name] for name in BUILDERS},
        "unpad": vars(flash_utils)["_get_unpad_data"],
        "attn": dict(transformers.AttentionInterface._global_mapping),
        "mask_iface": dict(masking.AttentionMaskInterface._global_mapping),
    }
    snap["modules"] = {
        (name, b): vars(mod).get(b)
        for name, mod in list(sys.modules.items())
        if name.startswith("transformers.models.") and mod is not None
        for b in BUILDERS
        if b in vars(mod)
    }
    return snap


@pytest.fixture(autouse=True)
def no_patch_leak():
    """Fail any test that leaves one of our patches (or a registry entry) behind."""
    from am_packing import backends, patches, scoped, scoped_registry
    from am_packing._patch import patch_name

    before = _snapshot()
    yield
    after = _snapshot()
    leaked = []
    for key in ("masking", "attn", "mask_iface"):
        for name, value in after[key].items():
            if before[key].get(name) is not value:
                leaked.append(f"{key}[{name}]")
    if after["unpad"] is not before["unpad"]:
        leaked.append("_get_unpad_data")
    for (name, b), value in after["modules"].items():
        if patch_name(value) is not None:
            leaked.append(f"{name}.{b}")
    assert not leaked, f"test leaked patches: {leaked}"
    assert patches._CONFIGURED.active is None and backends._VARLEN.active is None
    assert not scoped._USERS and all(r.active is None for r in scoped_registry.REGISTRIES.values())
    assert not [m for m, h in scoped._ENABLED.items() if h.applied], "a model was left with packing enabled"


@pytest.fixture
def no_setattr(monkeypatch):
    """Record every Patch/ItemPatch write, so drift tests can assert nothing was patched, not even briefly."""
    from am_packing._patch import ItemPatch, Patch

    writes = []
    for cls in (Patch, ItemPatch):
        original = vars(cls)["_set"]

        def spy(self, value, _original=original):
            writes.append(self.describe())
            return _original(self, value)

        monkeypatch.setattr(cls, "_set", spy)
    return writes


@pytest.fixture
def eager_flex(monkeypatch):
    """Run flex_attention uncompiled (torch's eager reference path): same op, no inductor build on CPU."""
    import transformers.integrations.flex_attention as fa
    from torch.nn.attention.flex_attention import flex_attention

    def run(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(fa, "compile_friendly_flex_attention", run)


COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attention_dropout=0.0,
)


def tiny_config(arch: str):
    """Tiny configs; Mistral/Qwen2/Gemma3 windows (8) are shorter than the test documents (up to 20)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=8)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    raise ValueError(arch)


@pytest.fixture
def make_model():
    from transformers import AutoModelForCausalLM

    def build(arch: str, attn_implementation: str = "eager", seed: int = 0):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            tiny_config(arch), attn_implementation=attn_implementation, dtype=torch.float32
        )
        return model.eval()

    return build


def _builder_copy(original, *, rename=None, ignore=(), move=None):
    """A stand-in for a transformers mask builder with a drifted signature, forwarding to `original`.

    `rename` maps original parameter names to the copy's, `ignore` names parameters the copy accepts but
    drops (silently, the worst drift), `move` = (name, index) re-orders one parameter. Like a real def, the
    copy raises TypeError for a name it does not declare, so a caller using the wrong spelling fails.
    """
    rename = rename or {}
    real = inspect.signature(original)
    params = [p.replace(name=rename.get(p.name, p.name)) for p in real.parameters.values()]
    if move is not None:
        name, index = move
        param = next(p for p in params if p.name == name)
        params.remove(param)
        params.insert(index, param)
    fake = real.replace(parameters=params)
    back = {new: old for old, new in rename.items()}

    def copy(*args, **kwargs):
        bound = fake.bind(*args, **kwargs)
        return original(**{back.get(k, k): v for k, v in bound.arguments.items() if k not in ignore})

    copy.__signature__ = fake
    copy.__name__ = copy.__qualname__ = original.__name__
    copy.__module__ = original.__module__
    return copy


@pytest.fixture
def builder_copy():
    return _builder_copy


# --------------------------------------------------------------------------- packed vs per-document checks
LENGTHS = (12, 5, 20, 9, 1, 17)  # several > the window (8); one single-token document


def documents(seed: int = 1, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]


def per_document(model, docs, *, with_grad: bool = True):
    """Logits of every document alone (eager attention on a copy) and, with_grad, the summed-loss gradients."""
    import copy

    import torch.nn.functional as F

    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    logits, loss = [], 0.0
    with torch.set_grad_enabled(with_grad):
        for doc in docs:
            ids = torch.tensor([doc])
            out = ref(input_ids=ids, use_cache=False).logits[0]
            logits.append(out.detach())
            if len(doc) > 1:
                loss = loss + F.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
    if not with_grad:
        return logits, None
    loss.backward()
    return logits, {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}


def worst_document_error(docs, batch, packed_logits, ref_logits):
    """Max |packed - alone| over every document; rows are mapped back through the indexed mask."""
    from am_packing.marker import as_plain

    mask = as_plain(batch["attention_mask"])
    seen, worst = 0, 0.0
    for r in range(mask.shape[0]):
        for d in range(1, int(mask[r].max()) + 1):
            sel = (mask[r] == d).nonzero().flatten()
            ids = batch["input_ids"][r, sel].tolist()
            k = next(i for i, doc in enumerate(docs) if doc == ids)
            worst = max(worst, (packed_logits[r, sel] - ref_logits[k]).abs().max().item())
            seen += 1
    assert seen == len(docs)
    return worst


def packed_loss_grads(model, batch, **extra):
    """Logits and summed-loss gradients of a packed batch (HF-style shift; the collator's -100s)."""
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], **extra).logits
    labels = batch["labels"]
    loss = F.cross_entropy(out[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ref_grads, grads, atol=1e-5):
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def exact():
    """The packed-vs-alone helpers above, for test modules (importlib mode cannot import conftest)."""
    import types

    return types.SimpleNamespace(
        documents=documents,
        per_document=per_document,
        worst=worst_document_error,
        packed=packed_loss_grads,
        grads_close=assert_grads_close,
        ATOL=1e-5,
    )
