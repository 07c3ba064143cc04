#!/usr/bin/env bash
# Export throughput of retort against the reference tools, on one machine, in one run.
#
#     scripts/bench_export.sh [WORKDIR]        (default WORKDIR: target/bench-export; about 4 GB at peak,
#                                              a tmpfs such as /dev/shm/retort-bench takes the disk out)
#
# 1. Writes a ~1 GB random BF16 Llama-architecture model (hidden 2048, 8 layers, vocab 32000; the
#    tiny fixture tokenizer) and a random rank-16 LoRA adapter on every linear layer.
# 2. Times retort: merge (merged safetensors), Q8_0 and Q4_K_M GGUF, each from the base.
# 3. Times gguf-py's numpy Q8_0 quantizer (convert_hf_to_gguf.py's --outtype q8_0 path) on the same
#    tensors. gguf-py cannot quantize k-quants, so Q4_K_M has no gguf-py number.
# 4. If llama.cpp's llama-quantize is found ($LLAMA_QUANTIZE, or on PATH), times it on retort's BF16
#    GGUF of the same model for Q8_0 and Q4_K_M, and checks that its tensors are byte-identical to
#    retort's. Build it with: cmake -B build -DGGML_NATIVE=OFF && cmake --build build --target llama-quantize
#
# Needs: cargo, a Python with numpy and gguf (PYTHON, default python3). Prints a table with ratios.
# Timings are wall-clock of whole commands (reading, computing, writing, and retort's read-back
# check), so they include I/O; run on an idle machine. Nothing here is asserted by tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-$ROOT/target/bench-export}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK"

echo "== building retort (release)"
cargo build --release --quiet -p retort-cli
cargo build --release --quiet -p retort-export --example quant_throughput
RETORT=$ROOT/target/release/retort
QUANT=$ROOT/target/release/examples/quant_throughput

echo "== writing the model and adapter in $WORK"
"$PYTHON" - "$WORK" "$ROOT/crates/retort-export/tests/fixtures/models/llama/base" <<'PY'
import json, shutil, sys
from pathlib import Path
import numpy as np

work, tok = Path(sys.argv[1]), Path(sys.argv[2])
base, adapter = work / "base", work / "adapter"
H, FF, L, NH, NKV, V, R = 2048, 5632, 8, 16, 4, 32000, 16
rng = np.random.default_rng(0)

def write_safetensors(path, tensors, dtype):
    header, offset, order = {"__metadata__": {"format": "pt"}}, 0, []
    for name, shape in tensors:
        n = int(np.prod(shape)) * (2 if dtype == "BF16" else 4)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
        order.append((name, shape))
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for name, shape in order:
            x = rng.standard_normal(shape, dtype=np.float32) * (0.02 if "norm" not in name else 0.1)
            if "norm" in name:
                x += 1.0
            if dtype == "BF16":
                u = x.view(np.uint32)
                x = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            f.write(x.tobytes())

if not (base / "model.safetensors").exists():
    base.mkdir(parents=True, exist_ok=True)
    hd = H // NH
    t = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}"
        t += [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.self_attn.q_proj.weight", (H, H)),
              (f"{p}.self_attn.k_proj.weight", (NKV * hd, H)), (f"{p}.self_attn.v_proj.weight", (NKV * hd, H)),
              (f"{p}.self_attn.o_proj.weight", (H, H)), (f"{p}.post_attention_layernorm.weight", (H,)),
              (f"{p}.mlp.gate_proj.weight", (FF, H)), (f"{p}.mlp.up_proj.weight", (FF, H)),
              (f"{p}.mlp.down_proj.weight", (H, FF))]
    t += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
    write_safetensors(base / "model.safetensors", t, "BF16")
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": FF,
           "num_hidden_layers": L, "num_attention_heads": NH, "num_key_value_heads": NKV, "vocab_size": V,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "bos_token_id": 300, "eos_token_id": 304, "dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(cfg))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tok / f, base / f)
    adapter.mkdir(parents=True, exist_ok=True)
    a = []
    for i in range(L):
        for m, (o, n) in {"self_attn.q_proj": (H, H), "self_attn.k_proj": (NKV * hd, H),
                          "self_attn.v_proj": (NKV * hd, H), "self_attn.o_proj": (H, H),
                          "mlp.gate_proj": (FF, H), "mlp.up_proj": (FF, H), "mlp.down_proj": (H, FF)}.items():
            k = f"base_model.model.model.layers.{i}.{m}"
            a += [(f"{k}.lora_A.weight", (R, n)), (f"{k}.lora_B.weight", (o, R))]
    write_safetensors(adapter / "adapter_model.safetensors", a, "F32")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": R, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
print("model bytes:", (base / "model.safetensors").stat().st_size)
PY

BYTES=$(stat -c %s "$WORK/base/model.safetensors")
now() { date +%s.%N; }
calc() { "$PYTHON" -c "print($1)"; }
elapsed() { calc "$2 - $1"; }
declare -A T

run_timed() { # key, command...
  local key=$1; shift
  local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now)
  T[$key]=$(elapsed "$t0" "$t1")
  printf '   %-22s %8.2f s\n' "$key" "${T[$key]}"
}

echo "== retort"
rm -rf "$WORK/out"
run_timed retort-merge "$RETORT" -q export --base "$WORK/base" --adapter "$WORK/adapter" --format merged --out "$WORK/out" --name bench
rm -rf "$WORK/out/merged"
run_timed retort-q8_0 "$RETORT" -q export --base "$WORK/base" --format gguf:q8_0 --out "$WORK/out" --name bench
run_timed retort-q4_k_m "$RETORT" -q export --base "$WORK/base" --format gguf:q4_k_m --out "$WORK/out" --name bench
run_timed retort-bf16 "$RETORT" -q export --base "$WORK/base" --format gguf:bf16 --out "$WORK/out" --name bench

echo "== quantization alone (tensors already in memory as f32), retort"
while read -r ty secs _; do
  T[kernel-$ty]=$secs
  printf '   %-22s %8.2f s\n' "retort-kernel-$ty" "$secs"
done < <("$QUANT" "$WORK/base/model.safetensors")

echo "== gguf-py (numpy) Q8_0 quantizer on the same tensors"
T[gguf-py-q8_0]=$("$PYTHON" - "$WORK/base/model.safetensors" <<'PY'
import json, sys, time
import numpy as np
import gguf
path = sys.argv[1]
with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little"); header = json.loads(f.read(n)); base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
total = 0.0
for name, info in header.items():
    if name == "__metadata__" or len(info["shape"]) < 2:
        continue
    s, e = info["data_offsets"]
    x = (data[base + s: base + e].view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    t = time.perf_counter()
    gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    total += time.perf_counter() - t
print(total)
PY
)
printf '   %-22s %8.2f s (quantization only; reading and writing not counted)\n' gguf-py-q8_0 "${T[gguf-py-q8_0]}"

LQ=${LLAMA_QUANTIZE:-$(command -v llama-quantize || true)}
if [ -n "$LQ" ] && [ -x "$LQ" ]; then
  echo "== llama-quantize ($LQ) from retort's BF16 GGUF"
  run_timed llama-q8_0 "$LQ" "$WORK/out/bench-BF16.gguf" "$WORK/out/llama-Q8_0.gguf" Q8_0
  run_timed llama-q4_k_m "$LQ" "$WORK/out/bench-BF16.gguf" "$WORK/out/llama-Q4_K_M.gguf" Q4_K_M
  echo "== byte-identical tensors, retort vs llama-quantize"
  "$PYTHON" - "$WORK/out" <<'PY'
import sys
import gguf
out = sys.argv[1]
for t in ["Q8_0", "Q4_K_M"]:
    a = {x.name: x for x in gguf.GGUFReader(f"{out}/bench-{t}.gguf").tensors}
    b = {x.name: x for x in gguf.GGUFReader(f"{out}/llama-{t}.gguf").tensors}
    same = sum(1 for k in a if k in b and a[k].tensor_type == b[k].tensor_type and a[k].data.tobytes() == b[k].data.tobytes())
    print(f"   {t}: {same} of {len(a)} tensors identical (llama-quantize wrote {len(b)})")
PY
else
  echo "== llama-quantize not found (set LLAMA_QUANTIZE=/path/to/llama-quantize): skipped"
fi

echo
echo "== results (input: $((BYTES / 1000000)) MB of BF16 weights; GB/s of that input)"
printf '   %-34s %8s %10s\n' "what" "seconds" "GB/s"
for k in retort-merge retort-q8_0 retort-q4_k_m llama-q8_0 llama-q4_k_m kernel-Q8_0 kernel-Q4_K kernel-Q6_K gguf-py-q8_0; do
  [ -n "${T[$k]:-}" ] && printf '   %-34s %8.2f %10.3f\n' "$k" "${T[$k]}" "$(calc "$BYTES / ${T[$k]} / 1e9")"
done
ratio() { printf '   %-46s %8.1fx\n' "$1" "$(calc "$2 / $3")"; }
echo
ratio "Q8_0 quantizer: retort vs gguf-py (numpy)" "${T[gguf-py-q8_0]}" "${T[kernel-Q8_0]}"
if [ -n "${T[llama-q8_0]:-}" ]; then
  ratio "Q8_0 file: retort vs llama-quantize" "${T[llama-q8_0]}" "${T[retort-q8_0]}"
  ratio "Q4_K_M file: retort vs llama-quantize" "${T[llama-q4_k_m]}" "${T[retort-q4_k_m]}"
fi
echo "   (above 1: retort is faster; retort's file times include reading safetensors and its read-back"
echo "    check; llama-quantize reads a BF16 GGUF; machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
