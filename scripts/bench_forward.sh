#!/usr/bin/env bash
# Forward-pass benchmark: retort (burn, CPU) vs PyTorch transformers on the same ~100M-parameter
# Llama-shaped random model, same machine, same thread count, in one run. Prints tokens/s and ratios.
#
#   scripts/bench_forward.sh            # needs a Python with torch + transformers (PYTHON=/path/to/python)
#
# Prefill: batch 4 x 512 tokens, logits of every position. Decode: greedy, 32-token prompts, 64 new
# tokens, batch 1 and 8, KV cache on both sides; decode rate excludes the prefill.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
WORK=${WORK:-$(mktemp -d)}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

echo "== model (random weights, Llama shape) in $WORK/model"
"$PYTHON" - "$WORK/model" <<'PY'
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                               num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                               tie_word_embeddings=False)
m = transformers.LlamaForCausalLM(cfg)
m.save_pretrained(sys.argv[1], safe_serialization=True)
print(f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters")
PY

echo "== retort (release build)"
cargo build --release --quiet -p retort-model --example bench_forward
RETORT=$(./target/release/examples/bench_forward "$WORK/model")
echo "$RETORT"

echo "== PyTorch transformers ($THREADS threads)"
TORCH=$("$PYTHON" - "$WORK/model" "$THREADS" <<'PY'
import json, sys, time, torch, transformers
torch.set_num_threads(int(sys.argv[2]))
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="sdpa").eval()
V = m.config.vocab_size
def prompt(seed, n): return [(i * 7919 + seed * 104729) % V for i in range(n)]
with torch.inference_mode():
    x = torch.tensor([prompt(s, 512) for s in range(4)])
    m(x)
    t = time.perf_counter()
    for _ in range(3): m(x).logits.float()
    prefill = 4 * 512 / ((time.perf_counter() - t) / 3)
    def decode(rows, new=64):
        p = torch.tensor([prompt(s, 32) for s in range(rows)])
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        m.generate(p, max_new_tokens=4, min_new_tokens=4, **kw)
        t = time.perf_counter(); m.generate(p, max_new_tokens=1, min_new_tokens=1, **kw); first = time.perf_counter() - t
        t = time.perf_counter(); m.generate(p, max_new_tokens=new, min_new_tokens=new, **kw); total = time.perf_counter() - t
        return rows * (new - 1) / (total - first)
    print(json.dumps({"prefill_tokens_per_s": prefill, "decode_b1_tokens_per_s": decode(1), "decode_b8_tokens_per_s": decode(8)}))
PY
)
echo "$TORCH"

echo "== ratios (retort / PyTorch; goal >= 1.0)"
"$PYTHON" - "$RETORT" "$TORCH" <<'PY'
import json, sys
r, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for k in ["prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s"]:
    print(f"{k:26s} retort {r[k]:10.1f}  torch {t[k]:10.1f}  ratio {r[k] / t[k]:.2f}x")
PY
