"""A ~125M-parameter Llama-shaped model with random weights, and one fixed training batch, for the
training benchmark (`scripts/bench_train.sh`). Nothing here is a fixture: the files go to a scratch
directory and are deleted by the caller.

    python scripts/make_bench_model.py OUT_DIR [--rows 4] [--seq 512]

Writes OUT_DIR/model/ (config.json, model.safetensors, f32, untied embeddings) and OUT_DIR/batch.json:
`{"ids": [[...], ...]}`, `rows` sequences of `seq` token ids. Every token is a label (labels = ids; both
sides shift by one inside the loss), no padding, no packing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(args.out / "model", safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq), generator=g)
    (args.out / "batch.json").write_text(json.dumps({"ids": ids.tolist()}))
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, batch {args.rows} x {args.seq} in {args.out}")


if __name__ == "__main__":
    main()
