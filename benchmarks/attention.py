"""am-attention: per-call overhead of the injected "te" attention path vs calling the kernel directly.

    python -m benchmarks.attention [--smoke] [--out FILE]

Both sides run the same DotProductAttention kernel (transformer-engine's when installed, else the SDPA
reference) on the same tensors, fwd+bwd, side by side in one process: "direct" calls the kernel with
the BSHD views HF attention produces; "injected" calls `te_attention_forward` on a real HF attention
module after `inject_te_attention_into_module`, i.e. everything the injection adds per call (dispatch,
checks, GQA handling, memoised mask/packing decisions, reshapes). Target: ratio < 1.03.
--smoke runs tiny shapes (CPU works); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import torch

from benchmarks._timing import make_timer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()

    import transformers

    import am_attention as A
    from am_attention.te_inject import default_dot_product_attention_cls

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        b, s, h, kv, d, layers, warmup, iters, repeats = 1, 64, 4, 2, 16, 2, 1, 2, 2
        dtype = torch.float32
    else:
        b, s, h, kv, d, layers, warmup, iters, repeats = 2, 4096, 32, 8, 128, 4, 5, 20, 5
        dtype = torch.bfloat16
    cls = default_dot_product_attention_cls() if device.type == "cuda" else A.ReferenceDotProductAttention
    kernel_name = f"{cls.__module__}.{cls.__qualname__}"

    cfg = transformers.LlamaConfig(
        hidden_size=h * d,
        num_attention_heads=h,
        num_key_value_heads=kv,
        head_dim=d,
        intermediate_size=8,
        num_hidden_layers=1,
        vocab_size=8,
    )
    with torch.device("meta"):  # only the module's attributes matter; no weights are needed
        modules = [transformers.models.llama.modeling_llama.LlamaAttention(cfg, i) for i in range(layers)]
    A.register_te_attention_backend()
    try:
        for m in modules:
            assert A.inject_te_attention_into_module(m, dot_product_attention_cls=cls)
        kernels = [vars(m)["attn_module"] for m in modules]
        for k in kernels:
            if hasattr(k, "to"):
                k.to(device)
        g = torch.Generator(device=device).manual_seed(0)

        def t(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

        # transformers hands attention functions [B, H, S, D] *views* of [B, S, H, D] projections
        # (`.view(...).transpose(1, 2)`); build the inputs the same way, so the direct call gets the dense
        # bshd tensors TE needs and neither side pays for a layout copy the real model would not make.
        qs = [t(b, s, h, d).transpose(1, 2) for _ in range(layers)]
        ks = [t(b, s, kv, d).transpose(1, 2) for _ in range(layers)]
        vs = [t(b, s, kv, d).transpose(1, 2) for _ in range(layers)]
        scaling = modules[0].scaling
        canonical = torch.ones(1, 1, s, s, dtype=torch.bool, device=device).tril()
        lengths = [s // 4, s // 2, s // 4]
        position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])[None].expand(b, s)
        cu = torch.tensor(
            [0, *torch.tensor(lengths * b).cumsum(0).tolist()], dtype=torch.int32, device=device
        )

        def direct(mode):
            def step():
                outs = []
                for kern, q, k, v in zip(kernels, qs, ks, vs):
                    if mode == "thd":
                        o = kern(
                            q.transpose(1, 2).reshape(b * s, h, d),
                            k.transpose(1, 2).reshape(b * s, kv, d),
                            v.transpose(1, 2).reshape(b * s, kv, d),
                            qkv_format="thd",
                            cu_seqlens_q=cu,
                            cu_seqlens_kv=cu,
                            max_seqlen_q=max(lengths),
                            max_seqlen_kv=max(lengths),
                            attn_mask_type="padding_causal",
                            window_size=(-1, 0),
                        )
                    else:
                        o = kern(
                            q.transpose(1, 2),
                            k.transpose(1, 2),
                            v.transpose(1, 2),
                            qkv_format="bshd",
                            attn_mask_type="causal",
                            window_size=(-1, 0),
                        )
                    outs.append(o.float().sum())
                torch.stack(outs).sum().backward()

            return step

        def injected(mode):
            def step():
                outs = []
                for m, q, k, v in zip(modules, qs, ks, vs):
                    if mode == "thd":
                        o, _ = A.te_attention_forward(
                            m, q, k, v, None, scaling=scaling, position_ids=position_ids
                        )
                    elif mode == "mask4d":
                        o, _ = A.te_attention_forward(m, q, k, v, canonical, scaling=scaling)
                    else:
                        o, _ = A.te_attention_forward(m, q, k, v, None, scaling=scaling)
                    outs.append(o.float().sum())
                torch.stack(outs).sum().backward()

            return step

        timer = make_timer(device)
        results: dict[str, object] = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "kernel": kernel_name,
            "dtype": str(dtype),
            "shape": dict(B=b, S=s, H=h, KV=kv, D=d, layers=layers),
            "smoke": args.smoke,
        }
        for mode, base in (("causal", "causal"), ("mask4d", "causal"), ("thd", "thd")):
            A.reset_te_attention_stats()
            d_fn, i_fn = direct(base), injected(mode)
            for _ in range(warmup):
                d_fn()
                i_fn()
            d_ms, i_ms = [], []
            for _ in range(repeats):  # interleaved so clock/thermal drift hits both sides alike
                d_ms.append(timer(d_fn, iters))
                i_ms.append(timer(i_fn, iters))
            d_med, i_med = statistics.median(d_ms), statistics.median(i_ms)
            stats = A.get_te_attention_stats()
            results[mode] = {"direct_ms": d_med, "injected_ms": i_med, "ratio": i_med / d_med, "stats": stats}
            print(
                f"{mode:7s} direct {d_med:8.3f} ms  injected {i_med:8.3f} ms  ratio {i_med / d_med:.4f}  "
                f"(hits {stats['te_hits']}, fallbacks {sum(v for k, v in stats.items() if k.startswith('fallback'))})"
            )
        results["pass_lt_1.03"] = all(results[m]["ratio"] < 1.03 for m in ("causal", "mask4d", "thd"))
        if args.smoke:
            print("SMOKE RUN: tiny CPU shapes, the numbers mean nothing")
        print(f"kernel: {kernel_name}; overhead target ratio < 1.03: {results['pass_lt_1.03']}")
    finally:
        for m in modules:
            A.remove_te_attention(m)
        A.unregister_te_attention_backend()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
