"""Diagnose packed flex_attention speed on a GPU: per-step time and dynamo recompiles (TORCH_LOGS=recompiles)."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from am_packing import configure_packing, pack_sequences


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    model = (
        AutoModelForCausalLM.from_config(cfg, attn_implementation="flex_attention", dtype=torch.bfloat16)
        .cuda()
        .train()
    )
    g = torch.Generator().manual_seed(1)
    lengths = torch.exp(torch.empty(64).uniform_(4.85, 8.3, generator=g)).int().tolist()
    docs = [torch.randint(1, 32000, (n,), generator=g).tolist() for n in lengths]
    packed = pack_sequences(docs, 4096)
    batches = [
        {k: v[i : i + 2].cuda() for k, v in packed.items()}
        for i in range(0, packed["input_ids"].shape[0] - 1, 2)
    ]
    with configure_packing("flex_attention"):
        for step, batch in enumerate(batches[:8]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.cuda.synchronize()
            print(f"flex step {step}: {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)
    model.set_attn_implementation("sdpa")
    for step, batch in enumerate(batches[:4]):
        b = {"input_ids": batch["input_ids"], "labels": batch["labels"]}  # plain causal, same shapes
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**b).loss.backward()
        torch.cuda.synchronize()
        print(f"sdpa (unpacked causal) step {step}: {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
