"""A Llama-shaped model with random weights, and one fixed training batch, for the training benchmarks
(`scripts/bench_train.sh`, `scripts/bench_gpu.sh`). Nothing here is a fixture: the files go to a scratch
directory and are deleted by the caller.

    python scripts/make_bench_model.py OUT_DIR [--shape bench|1b|3b|8b] [--rows 4] [--seq 512]
                                       [--dtype float32|bfloat16] [--device cpu|cuda]

`bench` (the default) is a ~125M-parameter model (f32, untied embeddings, vocab 32000); `1b`, `3b` and
`8b` have the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (vocab 128256; the 1B and 3B tie
their embeddings as published). `--device cuda` draws the weights on the GPU, which is much faster for
the large shapes. Writes OUT_DIR/model/ (config.json, model.safetensors) and OUT_DIR/batch.json:
`{"ids": [[...], ...]}`, `rows` sequences of `seq` token ids. Every token is a label (labels = ids; both
sides shift by one inside the loss), no padding, no packing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers


COMMON = dict(max_position_embeddings=8192, rope_theta=500000.0, num_key_value_heads=8, vocab_size=128256)
SHAPES = {
    "bench": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "1b": dict(COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               head_dim=64, tie_word_embeddings=True),
    "3b": dict(COMMON, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               head_dim=128, tie_word_embeddings=True),
    "8b": dict(COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               head_dim=128, tie_word_embeddings=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = transformers.LlamaConfig(**SHAPES[args.shape], dtype=args.dtype)
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(args.out / "model", safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq), generator=g)
    (args.out / "batch.json").write_text(json.dumps({"ids": ids.tolist()}))
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, batch {args.rows} x {args.seq} in {args.out}")


if __name__ == "__main__":
    main()
