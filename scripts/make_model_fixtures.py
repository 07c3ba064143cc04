#!/usr/bin/env python3
"""Writes the model-parity fixtures: tiny random models of every supported family, as Hugging Face
directories, with the logits and greedy continuations transformers computes for fixed token ids.

    /work/venv/bin/python scripts/make_model_fixtures.py   # rewrites crates/retort-model/tests/fixtures/

Reference versions (the fixtures were made with these; other versions may differ in the last bits):
    torch==2.15.0  transformers==5.23.0  safetensors==0.8.0  numpy==2.4.6

Each model switches its family's quirks on (GQA, biases, q/k norms, fused projections, soft-capping,
sliding windows shorter than the test sequence, tied and untied embeddings, scaled RoPE). Weights are
drawn with a larger spread than transformers' init so that logits differ visibly between positions and
tokens (with std 0.02 every model predicts a near-uniform distribution and a parity test proves little).
Everything is seeded: rerunning gives byte-identical files.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "retort-model" / "tests" / "fixtures"

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    # GQA, untied, Llama 3.1-style scaled RoPE with a small original context so scaling matters.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=10000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # Tied embeddings, linear RoPE scaling, attention biases on every projection.
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # Sliding window shorter than the test sequence.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5, tie_word_embeddings=False)),
    # q/k/v biases, tied, YaRN scaling.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0,
              rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    # q/k norm, head_dim different from hidden/heads.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    # Fused qkv and gate_up, LongRoPE, partial rotary, sliding window.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, partial_rotary_factor=0.5,
             original_max_position_embeddings=64, sliding_window=7,
             rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 2.0, 4.0],
                           "long_factor": [1.0, 2.0, 4.0, 10.0]})),
    # 1 + w norms, scaled embedding, GeGLU, soft-capping, alternating sliding window, sandwich norms.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=24,
               sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
               hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # q/k norm, sliding pattern with a local RoPE base, linear scaling on global layers.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=16,
               num_hidden_layers=3, sliding_window=4, sliding_window_pattern=3, rope_theta=1000000.0,
               rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
               hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
}

# Fixed inputs: two sequences of different lengths (the batched test pads the shorter one).
IDS = [[1, 17, 45, 200, 3, 99, 150, 7, 64, 31, 255, 12, 88, 5],
       [1, 250, 9, 33, 120, 77, 4, 18, 61]]
NEW_TOKENS = 12


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                # Gemma multiplies by 1 + w (w near 0); the others by w (near 1).
                center = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(center + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def make(name: str, cfg_cls: str, model_cls: str, extra: dict, seed: int) -> dict:
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize(model, seed)
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)

    expected = {}
    with torch.no_grad():
        for i, ids in enumerate(IDS):
            x = torch.tensor([ids])
            expected[f"logits_{i}"] = model(input_ids=x).logits[0].float().numpy()
        # Left-padded batch: what batched generation feeds the model.
        width = max(len(s) for s in IDS)
        batch = torch.tensor([[BASE["pad_token_id"]] * (width - len(s)) + s for s in IDS])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in IDS])
        # Positions count real tokens only, as generate() does, so padded rows match unpadded ones.
        padded_pos = (mask.cumsum(-1) - 1).clamp(min=0)
        expected["logits_padded"] = model(input_ids=batch, attention_mask=mask,
                                          position_ids=padded_pos).logits.float().numpy()
        expected["padded_ids"] = batch.numpy().astype(np.int64)
        expected["padded_mask"] = mask.numpy().astype(np.int64)
        # Packed: both sequences in one row, positions restarting at the boundary; transformers then
        # masks block-diagonally, so each segment's logits equal its unpacked logits.
        packed = torch.tensor([IDS[0] + IDS[1]])
        pos = torch.tensor([list(range(len(IDS[0]))) + list(range(len(IDS[1])))])
        expected["packed_ids"] = packed.numpy().astype(np.int64)
        expected["packed_position_ids"] = pos.numpy().astype(np.int64)
        expected["logits_packed"] = model(input_ids=packed, position_ids=pos,
                                          use_cache=False).logits[0].float().numpy()
        # bf16: the same weights rounded to bf16, computed in bf16. On a copy: `.to()` converts in
        # place, and the greedy runs below need the f32 weights that were saved.
        bf = copy.deepcopy(model).to(torch.bfloat16)
        for i, ids in enumerate(IDS):
            expected[f"logits_bf16_{i}"] = bf(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        del bf
        greedy = {}
        for i, ids in enumerate(IDS):
            g = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=BASE["pad_token_id"])
            greedy[str(i)] = g[0, len(ids):].tolist()
    save_file({k: np.ascontiguousarray(v) for k, v in expected.items()}, str(out / "expected.safetensors"))
    return {"ids": IDS, "greedy": greedy, "new_tokens": NEW_TOKENS,
            "arch": model_cls, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = {"transformers": transformers.__version__, "torch": torch.__version__, "models": {}}
    for seed, (name, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        index["models"][name] = make(name, cfg_cls, model_cls, extra, 1000 + seed)
        print(f"{name}: {index['models'][name]['params']} parameters")
    (OUT / "index.json").write_text(json.dumps(index, indent=1) + "\n")


if __name__ == "__main__":
    main()
