"""One check per package (and per packing backend) on one tiny model; each returns a `Verdict`.

Verdict kinds:
- ``exact``: the package changed the model and the result equals the reference computed another way;
- ``refused``: the package declined before applying (its apply/plan function, or a guard it installed,
  raised ValueError/RuntimeError/NotImplementedError from the package's own code, or it took no layer);
- ``silently wrong``: the package ran and the numbers differ from the reference (max abs diff given);
- ``crash``: any other exception (from transformers/torch under the patch, or a non-refusal error type);
- ``skip``: the check could not be run on this model (the model does not build, the backend is not
  supported by transformers for it, the comparison is insensitive on it), with the reason.

All comparisons are fp32 on CPU, in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tiny

# fp32 logits, max abs diff <= 1e-4 counts as exact. The compared paths run the same ops on the same
# weights but with other shapes (a packed row vs one document, masked SDPA vs is_causal, a stage boundary,
# a reference kernel), so reduction order and kernel blocking differ: measured errors are 1e-7..1e-5 for
# logits of order 1 (std ~0.8 at this init scale, over 2-4 layers; the integration suite uses 1e-5 on
# fixed architectures). 1e-4 leaves 10x headroom for MoE / SSM / chunked kernels, while a real mistake
# (one token of another document in a softmax, a dropped final norm, a missing logit scale) moves logits
# by >= 1e-2 here: each packing check also measures that control and reports `skip` if it is not > 1e-3.
LOGITS_ATOL = 1e-4
CONTROL_MIN = 1e-3
DOC_LENGTHS = (9, 6, 5)
PACKED_LENGTH = 22  # three documents + 2 padding slots at the end of the row
PLAIN_SHAPE = (2, 12)  # rows longer than the 4-token windows/chunks of the tiny configs

PACKAGE_ROOTS = {
    "am-packing": "am_packing",
    "am-attention": "am_attention",
    "am-pipelining": "am_pipelining",
    "am-kernels": "am_kernels",
    "am-precision": "am_precision",
}
REFUSAL_TYPES = (ValueError, RuntimeError, NotImplementedError)

# check name -> (column label, package)
CHECKS: dict[str, tuple[str, str]] = {
    "packing:eager": ("am-packing (eager)", "am-packing"),
    "packing:sdpa": ("am-packing (sdpa)", "am-packing"),
    "packing:flex_attention": ("am-packing (flex)", "am-packing"),
    "attention": ("am-attention TE injection", "am-attention"),
    "pipelining": ("am-pipelining 2 stages", "am-pipelining"),
    "kernels": ("am-kernels Liger", "am-kernels"),
    "precision": ("am-precision bf16 cast", "am-precision"),
}
DEFAULT_CHECKS = ("packing:eager", "packing:sdpa", "attention", "pipelining", "kernels", "precision")


@dataclass
class Verdict:
    check: str
    kind: str  # exact | refused | silently wrong | crash | skip
    detail: str = ""
    max_diff: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def cell(self) -> str:
        if self.kind == "exact":
            return f"exact ({self.detail})" if self.detail else "exact"
        if self.kind == "silently wrong":
            parts = []
            if self.max_diff is not None:
                parts.append(f"max diff {self.max_diff:.2e}")
            if self.detail:
                parts.append(self.detail)
            return f"silently wrong ({'; '.join(parts)})"
        return f"{self.kind}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Skip(Exception):
    """The check cannot run on this model (becomes a `skip` verdict)."""


def _package_dirs() -> dict[str, str]:
    import importlib

    dirs = {}
    for package, module in PACKAGE_ROOTS.items():
        mod = importlib.import_module(module)
        dirs[package] = str(Path(mod.__file__).resolve().parent) + os.sep
    return dirs


def raised_by(exc: BaseException) -> str | None:
    """The am-* package whose own code raised `exc` (the innermost traceback frame), else None."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if last is None:
        return None
    last = str(Path(last).resolve())
    for package, directory in _package_dirs().items():
        if last.startswith(directory):
            return package
    return None


def describe(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        f = frames[-1]
        where = f" [{Path(f.filename).name}:{f.lineno}]"
    return f"{type(exc).__name__}: {text[:limit]}{where}"


def classify_exception(check: str, exc: BaseException) -> Verdict:
    package = CHECKS[check][1]
    if isinstance(exc, Skip):
        return Verdict(check, "skip", str(exc))
    if isinstance(exc, REFUSAL_TYPES) and raised_by(exc) == package and str(exc).strip():
        return Verdict(check, "refused", " ".join(str(exc).split()), info={"error_type": type(exc).__name__})
    return Verdict(check, "crash", describe(exc), info={"raised_in": raised_by(exc) or "outside am-*"})


# ------------------------------------------------------------------------------------------- helpers


def _accepts(fn: Callable[..., Any], name: str, *, via_kwargs: bool = False) -> bool:
    """`fn` names parameter `name` (or, with `via_kwargs`, takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    return via_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def logits_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if (
        logits is None
        and isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], torch.Tensor)
    ):
        logits = output[0]
    if logits is None:
        raise TypeError(f"no logits in the model output ({type(output).__name__})")
    return logits


def forward(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Logits of `model`. `use_cache=False` wherever the forward takes it (named or through ``**kwargs``:
    a cache of a hybrid model with only recurrent layers cannot even report its length); the other kwargs
    only where the forward names them (a `position_ids` swallowed by ``**kwargs`` may be ignored or reach
    a submodule that rejects it: a forward that does not name it is reported as such)."""
    call: dict[str, Any] = {"input_ids": input_ids}
    if _accepts(model.forward, "use_cache", via_kwargs=True):
        call["use_cache"] = False
    for key, value in kwargs.items():
        if value is not None and _accepts(model.forward, key):
            call[key] = value
    return logits_of(model(**call)).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a - b).abs()
    if torch.isnan(d).any():
        return math.nan
    return float(d.max()) if d.numel() else 0.0


def compare(check: str, got: torch.Tensor, ref: torch.Tensor, detail: str = "", **info: Any) -> Verdict:
    if torch.isnan(ref).any() or torch.isinf(ref).any():
        raise Skip("the reference logits are not finite")
    diff = max_diff(got, ref)
    if not math.isnan(diff) and diff <= LOGITS_ATOL:
        return Verdict(check, "exact", detail, max_diff=diff, info=info)
    return Verdict(check, "silently wrong", detail, max_diff=diff, info=info)


class Model:
    """Builds the tiny model of one architecture (same weights for every attention backend)."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.config, self.info = tiny.tiny_config(arch)
        self.model_type = getattr(self.config, "model_type", arch)
        self._unsupported: dict[str, str] = {}
        self.docs = tiny.documents(self.config, DOC_LENGTHS)
        generator = torch.Generator().manual_seed(1)
        allowed = torch.cat(tiny.documents(self.config, (PLAIN_SHAPE[0] * PLAIN_SHAPE[1],), seed=2))
        self.plain_ids = allowed[torch.randperm(len(allowed), generator=generator)].view(*PLAIN_SHAPE)

    def build(self, attn: str | None = "sdpa") -> torch.nn.Module:
        """The model for backend `attn`; `Skip` when transformers does not support it for this model."""
        if attn in self._unsupported:
            raise Skip(self._unsupported[attn])
        config = copy.deepcopy(self.config)
        try:
            return tiny.build_model(self.arch, config, attn)
        except (ValueError, ImportError) as exc:
            text = str(exc).replace("_", "").lower()
            if attn is not None and (
                attn.replace("_", "").lower() in text or "attention implementation" in text
            ):
                self._unsupported[attn] = (
                    f"transformers does not support {attn} for this model ({describe(exc, 160)})"
                )
                raise Skip(self._unsupported[attn]) from exc
            raise

    def default_attn(self) -> str | None:
        try:
            self.build("sdpa")
            return "sdpa"
        except Skip:
            return "eager"

    def pad_id(self) -> int:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        pad = getattr(text, "pad_token_id", None)
        return pad if isinstance(pad, int) and 0 <= pad < tiny.text_vocab(self.config) else 0


# -------------------------------------------------------------------------------------------- checks


def check_packing(m: Model, backend: str) -> Verdict:
    """The path users take, `enable_packing(model, backend)`, decides the cell; `configure_packing` runs on
    the same weights too and must give exact or refused (recorded in info; silently wrong there is the cell)."""
    import am_packing

    check = f"packing:{backend}"
    model = m.build(backend)
    batch = am_packing.pack_sequences([d.tolist() for d in m.docs], PACKED_LENGTH, pad_token_id=m.pad_id())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    takes_positions = _accepts(model.forward, "position_ids")
    with torch.no_grad():
        # reference: each document alone through the unpatched model, laid out like the packed row
        alone = [forward(model, doc[None])[0] for doc in m.docs]
        ref = torch.zeros(*ids.shape, alone[0].shape[-1])
        for doc_id, logits in enumerate(alone, start=1):
            ref[0, (mask[0] == doc_id).nonzero().flatten()] = logits
        real = mask > 0
        # control: the packed row through the plain model (no document mask) must differ, else the
        # comparison cannot tell a leak from exactness
        control = max_diff(forward(model, ids)[real], ref[real])
    info: dict[str, Any] = {"control_diff": control, "forward_takes_position_ids": takes_positions}
    info["check_packing_support"] = _call_check(am_packing.check_packing_support, model, backend)
    if not (control > CONTROL_MIN):
        raise Skip(f"insensitive: the unmasked packed row differs from the documents by only {control:.1e}")
    detail = "" if takes_positions else "forward takes no position_ids"

    def packed(entry: Callable[[torch.nn.Module], Any], model: torch.nn.Module) -> Verdict:
        try:
            with torch.no_grad(), entry(model):
                got = forward(model, ids, attention_mask=mask, position_ids=batch["position_ids"])
        except Exception as exc:
            return classify_exception(check, exc)
        return compare(check, got[real], ref[real], detail)

    scoped = packed(lambda mod: am_packing.enable_packing(mod, backend), model)
    if _accepts(model.forward, "attention_mask"):
        configured = packed(lambda mod: am_packing.configure_packing(backend), m.build(backend))
    else:
        configured = Verdict(
            check, "skip", "forward takes no attention_mask: no packed mask reaches the model"
        )
    info["enable_packing"] = scoped.cell()
    info["configure_packing"] = configured.cell()
    verdict = scoped
    if configured.kind in ("silently wrong", "crash") and scoped.kind not in ("silently wrong", "crash"):
        verdict = configured
        verdict.detail = f"configure_packing: {verdict.detail}".rstrip(": ")
    verdict.info = {**info, **verdict.info}
    return verdict


def _call_check(fn: Callable[..., Any], model: torch.nn.Module, backend: str) -> str:
    """What a plan/check function says (recorded for the report; the verdict comes from applying)."""
    try:
        result = fn(model, backend)
    except Exception as exc:
        return f"raises {describe(exc, 200)}"
    return repr(result)[:300]


def check_attention(m: Model) -> Verdict:
    import am_attention

    model = m.build(m.default_attn())
    plan = am_attention.plan_te_attention(model)
    with torch.no_grad():
        ref = forward(model, m.plain_ids)
        am_attention.reset_te_attention_stats()
        handle = am_attention.inject_te_attention(
            model, dot_product_attention_cls=am_attention.ReferenceDotProductAttention
        )
        try:
            taken = list(getattr(handle, "taken", []))
            got = forward(model, m.plain_ids)
            stats = {k: v for k, v in am_attention.get_te_attention_stats().items() if v}
        finally:
            handle.revert()
    calls = int(stats.get("te_hits", 0)) + int(stats.get("te_thd_hits", 0))
    reasons = sorted({reason for _, ok, reason in plan if not ok})
    info = {"taken": len(taken), "candidates": len(plan), "kernel_calls": calls, "stats": stats,
            "not_taken_reasons": reasons}  # fmt: skip
    if not taken:
        why = "; ".join(reasons) if reasons else "no attention module found"
        return Verdict("attention", "refused", f"no layer taken ({why})", info=info)
    detail = f"{len(taken)}/{len(plan)} modules, {calls} kernel calls"
    fallbacks = {k: v for k, v in stats.items() if k.startswith("fallback") and v}
    if fallbacks:
        detail += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(fallbacks.items())) + ")"
    return compare("attention", got, ref, detail, **info)


def check_pipelining(m: Model) -> Verdict:
    import am_pipelining

    model = m.build(m.default_attn())
    problems = am_pipelining.get_pipeline_problems(model, num_stages=2)
    with torch.no_grad():
        ref = forward(model, m.plain_ids)
        stages = am_pipelining.split_model_into_stages(copy.deepcopy(model), 2)
        hidden = stages[0](m.plain_ids)
        got = logits_of(stages[1](hidden)).float()
    info = {"get_pipeline_problems": problems}
    detail = "get_pipeline_problems listed problems but the split went ahead" if problems else ""
    return compare("pipelining", got, ref, detail, **info)


def torch_liger_ops() -> Any:
    """Liger's op signatures in plain torch (the same as packages/am-kernels/tests/conftest.py `torch_ops`)."""
    from am_kernels import LigerOps

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True):
        dtype = x.dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if casting_mode == "gemma":
            return (normed * (offset + weight.float())).to(dtype)
        return (offset + weight) * normed.to(dtype)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def flce(hidden_states, lm_head_weight, labels, hidden_size, num_items_in_batch=None, ignore_index=-100,
             shift_labels=None, final_logit_softcapping=None, **kwargs):  # fmt: skip
        logits = (hidden_states.reshape(-1, hidden_size) @ lm_head_weight.t()).float()
        if final_logit_softcapping is not None:
            logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
        if shift_labels is None:
            labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = torch.nn.functional.cross_entropy(
            logits, shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
        )
        return loss / num_items_in_batch if num_items_in_batch is not None else loss

    def ce(logits, target, ignore_index=-100, reduction="mean"):
        return torch.nn.functional.cross_entropy(
            logits.float(), target, ignore_index=ignore_index, reduction=reduction
        )

    return LigerOps(
        rms_norm=rms_norm,
        swiglu=lambda a, b: torch.nn.functional.silu(a) * b,
        geglu=lambda a, b: torch.nn.functional.gelu(a, approximate="tanh") * b,
        rotary_pos_emb=rope,
        fused_linear_cross_entropy=flce,
        cross_entropy=ce,
        source="torch reference (tests/zoo)",
    )


def check_kernels(m: Model) -> Verdict:
    import am_kernels

    model = m.build(m.default_attn())
    with torch.no_grad():
        before = forward(model, m.plain_ids)
        am_kernels.patch_liger_kernel(model, ops=torch_liger_ops())
        try:
            report = am_kernels.get_patch_report(model)
            patched = len(getattr(report, "modules", None) or getattr(report, "patched", None) or [])
            got = forward(model, m.plain_ids)
        finally:
            am_kernels.unpatch_liger_kernel(model)
        after = forward(model, m.plain_ids)
    info = {"report": _short(report), "patched_entries": patched}
    if am_kernels.get_patch_report(model) or not torch.equal(before, after):
        return Verdict(
            "kernels", "silently wrong", "undo is not exact", max_diff=max_diff(after, before), info=info
        )
    return compare("kernels", got, before, f"{patched} patched" if patched else "", **info)


def _short(report: Any) -> str:
    try:
        text = report.format() if hasattr(report, "format") else repr(report)
    except Exception:
        text = repr(report)
    return text[:600]


def transformers_fp32_names(model: torch.nn.Module) -> tuple[set[str], torch.nn.Module]:
    """Parameters transformers keeps in fp32 when loading `model` with ``dtype=torch.bfloat16``."""
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp, dtype=torch.bfloat16, local_files_only=True)
    return {n for n, p in loaded.named_parameters() if p.dtype == torch.float32}, loaded.eval()


def hardcoded_fp32_names(m: Model, attn: str | None) -> set[str]:
    """Parameters the modeling code creates in fp32 whatever the requested dtype (``nn.Linear(...,
    dtype=torch.float32)`` routers, ``torch.FloatTensor`` parameters): fp32 after ``_from_config(dtype=
    bfloat16)``, which applies no keep-in-fp32 rule. transformers' loader leaves them fp32 by construction,
    not by its `_keep_in_fp32_modules(_strict)` rule, so they are outside the comparison (reported)."""
    torch.manual_seed(0)
    built = tiny.causal_lm_class(m.arch)._from_config(copy.deepcopy(m.config), dtype=torch.bfloat16,
                                                      **({"attn_implementation": attn} if attn else {}))  # fmt: skip
    return {n for n, p in built.named_parameters() if p.dtype == torch.float32}


def check_precision(m: Model) -> Verdict:
    import am_precision

    attn = m.default_attn()
    model = m.build(attn)
    try:
        loaded_fp32, loaded = transformers_fp32_names(model)
        hardcoded = hardcoded_fp32_names(m, attn)
    except Exception as exc:
        raise Skip(f"transformers' own bf16 load (reference) fails: {describe(exc, 200)}") from exc
    theirs = loaded_fp32 - hardcoded
    cast = copy.deepcopy(model)
    am_precision.cast_model_to_dtype(cast, torch.bfloat16)
    ours_all = {n for n, p in cast.named_parameters() if p.dtype == torch.float32}
    ours = ours_all - hardcoded
    others = {p.dtype for n, p in cast.named_parameters() if n not in ours_all} - {torch.bfloat16}
    info = {"fp32_kept": sorted(ours_all), "transformers_fp32": sorted(loaded_fp32),
            "hardcoded_fp32": sorted(hardcoded)}  # fmt: skip
    with torch.no_grad():
        try:
            forward(cast, m.plain_ids)
        except Exception as exc:
            try:
                forward(loaded, m.plain_ids)
            except Exception as exc2:
                raise Skip(
                    f"transformers' own bf16 model fails the same forward on CPU: {describe(exc2, 200)}"
                ) from exc2
            raise exc
    if ours != theirs or others:
        extra, missing = sorted(ours - theirs), sorted(theirs - ours)
        detail = f"fp32 set differs from transformers': extra {extra[:4]}, missing {missing[:4]}"
        if others:
            detail += f"; other dtypes {sorted(map(str, others))}"
        return Verdict("precision", "silently wrong", detail, info=info)
    notes = [f"{len(ours)} fp32"] if ours else []
    if hardcoded:
        kept = len(hardcoded & ours_all)
        notes.append(f"{len(hardcoded)} hard-coded fp32 params, {kept} kept fp32")
    return Verdict("precision", "exact", "; ".join(notes), info=info)


def run_check(m: Model, check: str) -> Verdict:
    if check.startswith("packing:"):
        return check_packing(m, check.split(":", 1)[1])
    return {
        "attention": check_attention,
        "pipelining": check_pipelining,
        "kernels": check_kernels,
        "precision": check_precision,
    }[check](m)
