#!/usr/bin/env bash
# GPU LoRA and QLoRA benchmark: retort (burn on wgpu, Vulkan with the SPIR-V compiler) against PyTorch +
# PEFT (CUDA, sdpa attention; bitsandbytes for QLoRA) on the same GPU, in one run. Needs an NVIDIA GPU,
# nvidia-smi, the Vulkan loader and a Python with torch, transformers and peft (bitsandbytes for the
# QLoRA peer: without it that row is skipped and says so).
#
#   scripts/bench_gpu.sh
#
# For each SHAPE (default "1b 3b 8b": random weights of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B's
# shapes, since nothing is downloaded) and each MODE (default "lora qlora"): one fixed batch of ROWS x SEQ
# tokens (default 4 x 2048, every token a label), LoRA r=16 alpha=32 on every linear layer, AdamW lr 1e-4,
# clipping at 1.0, activation checkpointing per layer on both sides (CHECKPOINTING=0 turns it off), base
# in bf16 (lora) or NF4 with double quantization and bf16 compute (qlora), adapters and optimizer state
# in f32 on both sides. The adapters' matmuls run in bf16 on both sides (retort's `train.autocast`, on by
# default on GPUs; `torch.autocast` for PEFT, as HF Trainer's `bf16=True` does); AUTOCAST=0 runs them in
# f32 on both sides instead. OFFLOAD=1 keeps retort's checkpointed layer inputs in host memory
# (`train.offload_checkpoints`; for long SEQ, e.g. ROWS=1 SEQ=78475 SHAPES=8b MODES=qlora against
# Unsloth's 24 GB figure). WARMUP untimed steps (default 2: the first one compiles and autotunes kernels),
# then STEPS timed steps (default 3).
#
# Printed per row: tokens/s; peak device memory as nvidia-smi saw it for the process (sampled every
# 100 ms, minus what was in use before it started: the same meter for both sides, so CUDA context and
# allocator caches count alike); MFU; the step-0 loss of each side (same weights and batch, B = 0 at
# the start, so they must agree to bf16 rounding). MFU counts the model FLOPs of a step with a frozen
# base: 2N forward + 2N backward (input gradients only; frozen weights get none) per token for the N
# parameters of the linear layers and the LM head, plus 12 L S d for attention scores; checkpointing's
# recomputation is not counted. Peak: PEAK_TFLOPS (default 989, the H100/H200 SXM dense bf16 datasheet
# figure).
#
# BENCH_TRAIN=path uses a prebuilt `bench_train` example (built with `--features retort-model/vulkan`);
# otherwise it is built here. RETORT_DEVICE (default wgpu:0) is where retort runs, PEFT_DEVICE (default
# cuda) where PyTorch does. WORK=dir keeps the models there (default: a temporary directory; each
# shape's model is deleted after its rows, unless KEEP_MODELS=1: a later run with the same WORK
# reuses it, so mind that ROWS and SEQ then come from the kept batch). Results are also written as JSON lines to RESULTS (default $WORK/results.jsonl). RUN_TIMEOUT=seconds bounds
# each process (a row then says so instead of its numbers). SKIP_PEFT=1 runs retort's side alone.
# PROFILE_KERNELS=1 runs retort's side under cubecl's kernel profiler (every kernel timed, so the step
# is slower than unprofiled), keeps its stderr as LOGS/SHAPE-MODE.stderr (LOGS defaults to WORK) and
# prints scripts/cubecl_profile.py's breakdown of it: kernel time against wall time per step, kernels
# compiled and autotuned, the costliest kernels.
#
# The first step on a machine is mostly cubecl choosing and compiling kernels: it benchmarks several
# candidate kernels for each new matmul and reduction shape (autotuning) and the Vulkan driver compiles
# each candidate, which on an H200 took from 0.1 s to 25 s a candidate. cubecl keeps its choices and
# device measurements in target/environment under the repository (the directory it runs from), so a
# second run on the machine skips them; copy that directory to a fresh machine with the same GPU and
# driver to skip them there. CUBECL_AUTOTUNE_LEVEL=minimal tries fewer candidates.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-"1b 3b 8b"}
MODES=${MODES:-"lora qlora"}
SEQ=${SEQ:-2048}
ROWS=${ROWS:-4}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-3}
CHECKPOINTING=${CHECKPOINTING:-1}
AUTOCAST=${AUTOCAST:-1}
RETORT_DEVICE=${RETORT_DEVICE:-wgpu:0}
PEFT_DEVICE=${PEFT_DEVICE:-cuda}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
RUN_TIMEOUT=${RUN_TIMEOUT:-0} # seconds for each side's process (0: none)
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT # the 8B model alone is 16 GB
fi
WORK=$(cd "$WORK" && pwd)
RESULTS=${RESULTS:-$WORK/results.jsonl}
LOGS=${LOGS:-$WORK}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
: >"$RESULTS"

if [ -z "${BENCH_TRAIN:-}" ]; then
    echo "== retort (release build, Vulkan)"
    cargo build --release --quiet -p retort-train --example bench_train --features retort-model/vulkan
    BENCH_TRAIN=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/bench_train
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader

# Runs "$@", prints its stdout (one JSON object), and appends {"peak_device_bytes": ...} measured by
# sampling nvidia-smi while it ran.
with_peak() {
    local log=$WORK/smi.log base pid rc=0 out
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
    pid=$!
    out=$(timeout "$RUN_TIMEOUT" "$@") || rc=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$rc" = 0 ] || { echo "{\"error\": \"exit $rc$([ "$rc" = 124 ] && echo ": over RUN_TIMEOUT")\"}"; return 0; }
    local peak
    peak=$(sort -n "$log" | tail -1)
    "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); d["peak_device_bytes"]=(int(sys.argv[2])-int(sys.argv[3]))*2**20; print(json.dumps(d))' \
        "$out" "${peak:-$base}" "$base"
}

# Runs bench_train ("$@") through with_peak, under cubecl's profiler when PROFILE_KERNELS=1 (its
# configuration file is read from the working directory); NAME names the log.
retort_row() { # NAME ARGS...
    local name=$1
    shift
    if [ "${PROFILE_KERNELS:-0}" != 1 ]; then
        with_peak "$@"
        return
    fi
    local dir log=$LOGS/$name.stderr
    dir=$(mktemp -d)
    # The profiler's configuration sits in a directory of its own; cubecl's store of autotune results
    # and device measurements stays where unprofiled runs keep it.
    printf '[environment]\npath = { directory = "%s" }\n' "$PWD/target/environment" >"$dir/cubecl.toml"
    printf '[profiling.logger]\nlevel = "basic"\nstderr = true\n[compilation.logger]\nlevel = "basic"\nstderr = true\n[autotune.logger]\nlevel = "minimal"\nstderr = true\n' >>"$dir/cubecl.toml"
    (cd "$dir" && with_peak "$@" 2>"$log")
    grep '^bench_train:' "$log" >&2 || true
    "$PYTHON" scripts/cubecl_profile.py "$log" >&2 || true
    rm -rf "$dir"
}

CK=()
[ "$CHECKPOINTING" = 1 ] && CK=(--checkpointing)
[ "$AUTOCAST" = 1 ] && CK+=(--autocast)
# retort's side only: PyTorch + PEFT has no offloaded checkpointing (Unsloth's addition).
RETORT_ONLY=()
[ "$CHECKPOINTING" = 1 ] && [ "${OFFLOAD:-0}" = 1 ] && RETORT_ONLY=(--offload)
for shape in $SHAPES; do
    if [ -e "$WORK/$shape/batch.json" ]; then
        echo "== $shape: model and batch kept in $WORK/$shape"
    else
        echo "== $shape: model (random weights, bf16) and batch $ROWS x $SEQ"
        "$PYTHON" scripts/make_bench_model.py "$WORK/$shape" --shape "$shape" --rows "$ROWS" --seq "$SEQ" \
            --dtype bfloat16 --device "$PEFT_DEVICE" 2>/dev/null
    fi
    for mode in $MODES; do
        NF4=()
        [ "$mode" = qlora ] && NF4=(--nf4)
        echo "== $shape $mode: retort on $RETORT_DEVICE"
        R=$(retort_row "$shape-$mode" "$BENCH_TRAIN" "$WORK/$shape/model" "$WORK/$shape/batch.json" "$WARMUP" "$STEPS" \
            --device "$RETORT_DEVICE" --precision bf16 --no-probe "${CK[@]}" "${NF4[@]}" "${RETORT_ONLY[@]}")
        echo "$R"
        echo "== $shape $mode: PyTorch + PEFT on $PEFT_DEVICE"
        if [ "${SKIP_PEFT:-0}" = 1 ]; then
            P='{"error": "skipped (SKIP_PEFT=1)"}'
        elif [ "$mode" = qlora ] && ! "$PYTHON" -c 'import bitsandbytes' 2>/dev/null; then
            P='{"error": "bitsandbytes is not installed"}'
        else
            P=$(with_peak "$PYTHON" scripts/bench_train_peft.py "$WORK/$shape/model" "$WORK/$shape/batch.json" \
                "$WARMUP" "$STEPS" "$(nproc)" --device "$PEFT_DEVICE" --precision bf16 "${CK[@]}" "${NF4[@]}" 2>/dev/null)
        fi
        echo "$P"
        "$PYTHON" -c 'import json,sys; print(json.dumps({"shape": sys.argv[1], "mode": sys.argv[2], "seq": int(sys.argv[6]), "config": json.load(open(sys.argv[3])), "retort": json.loads(sys.argv[4]), "peft": json.loads(sys.argv[5])}))' \
            "$shape" "$mode" "$WORK/$shape/model/config.json" "$R" "$P" "$SEQ" >>"$RESULTS"
    done
    [ "${KEEP_MODELS:-0}" = 1 ] || rm -rf "${WORK:?}/$shape"
done

"$PYTHON" - "$RESULTS" "$PEAK_TFLOPS" <<'PY'
import json, sys
peak = float(sys.argv[2]) * 1e12
gib = lambda b: b / 2**30 if b else float("nan")

def flops_per_token(c, seq):
    h, i, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    linear = L * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * c["vocab_size"]
    return 4 * linear + 12 * L * seq * q

print(f"{'shape':6s}{'mode':7s}{'impl':8s}{'tokens/s':>10s}{'peak GiB':>10s}{'MFU':>7s}{'loss0':>10s}")
for line in open(sys.argv[1]):
    row = json.loads(line)
    for name in ("retort", "peft"):
        d = row[name]
        if "error" in d:
            print(f"{row['shape']:6s}{row['mode']:7s}{name:8s}  {d['error']}")
            continue
        fpt = flops_per_token(row["config"], row["seq"])
        mfu = d["tokens_per_s"] * fpt / peak
        print(f"{row['shape']:6s}{row['mode']:7s}{name:8s}{d['tokens_per_s']:10.0f}{gib(d['peak_device_bytes']):10.2f}"
              f"{mfu:7.1%}{d['losses'][0]:10.4f}")
    r, p = row["retort"], row["peft"]
    if "error" not in r and "error" not in p:
        print(f"{'':21s}ratio {r['tokens_per_s'] / p['tokens_per_s']:.2f}x tokens/s (goal >= 2 on QLoRA), "
              f"{r['peak_device_bytes'] / p['peak_device_bytes']:.2f}x memory (goal <= 0.5 on QLoRA), "
              f"|loss0 diff| {abs(r['losses'][0] - p['losses'][0]):.1e}")
PY
