#!/usr/bin/env bash
# LoRA training benchmark: retort (burn, CPU, f32) vs PyTorch + PEFT on the same ~125M-parameter
# Llama-shaped random model, same machine, same thread count, one after the other, each in its own
# process. Prints tokens/s, peak RSS, their ratios, the plan's memory prediction against retort's
# measured peak, and both step-0 losses (which must agree: same weights, adapters start with B = 0).
#
#   scripts/bench_train.sh        # needs a Python with torch + transformers + peft (PYTHON=...)
#
# The step: one micro-batch of 4 x 512 tokens, every token a label, LoRA r=16 alpha=32 on every linear
# layer (dropout 0), AdamW lr 1e-4, clipping at 1.0. WARMUP untimed steps (default 1), then STEPS timed
# steps (default 3). PROFILE=1 adds one step split into forward / backward / optimizer on both sides.
# CHECKPOINTING=1 turns activation checkpointing on, on both sides: each decoder layer recomputed in the
# backward pass. PRECISION=bf16 holds the base in bf16 on both sides, the adapters' products autocast to
# bf16 (retort's train.autocast; torch.autocast for PEFT): on CPUs with AVX512-BF16 retort's products
# then run on its bf16 kernel (retort_model::gemm_bf16), PyTorch's on oneDNN's.
# WORK=dir keeps the model and batch there (default: a temporary directory, deleted at the end).
# Timings are only meaningful on an otherwise idle machine: the load average is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
WARMUP=${WARMUP:-1}
STEPS=${STEPS:-3}
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT # the model is 0.5 GB
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
EXTRA_ARGS=()
[ "${PROFILE:-0}" = 1 ] && EXTRA_ARGS=(--profile)
[ "${CHECKPOINTING:-0}" = 1 ] && EXTRA_ARGS+=(--checkpointing)
PRECISION=${PRECISION:-f32}
[ "$PRECISION" != f32 ] && EXTRA_ARGS+=(--precision "$PRECISION" --autocast)
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

echo "== $(nproc) cores, $THREADS threads, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== retort (release build)"
cargo build --release --quiet -p retort-train --example bench_train

echo "== model (random weights, Llama shape) and batch in $WORK"
"$PYTHON" scripts/make_bench_model.py "$WORK" 2>/dev/null

echo "== retort: $WARMUP warm-up + $STEPS timed steps"
RETORT=$("$TARGET_DIR/release/examples/bench_train" "$WORK/model" "$WORK/batch.json" "$WARMUP" "$STEPS" \
    "${EXTRA_ARGS[@]}")
echo "$RETORT"

echo "== PyTorch + PEFT: $WARMUP warm-up + $STEPS timed steps"
PEFT=$("$PYTHON" scripts/bench_train_peft.py "$WORK/model" "$WORK/batch.json" "$WARMUP" "$STEPS" "$THREADS" \
    "${EXTRA_ARGS[@]}" 2>/dev/null)
echo "$PEFT"

echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" - "$RETORT" "$PEFT" <<'PY'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
gib = lambda b: b / 2**30
print(f"{'':24s}{'retort':>12s}{'peft':>12s}{'ratio':>10s}  goal")
print(f"{'tokens/s':24s}{r['tokens_per_s']:12.1f}{p['tokens_per_s']:12.1f}"
      f"{r['tokens_per_s'] / p['tokens_per_s']:9.2f}x  >= 1.5")
print(f"{'seconds/step':24s}{r['seconds_per_step']:12.2f}{p['seconds_per_step']:12.2f}")
print(f"{'peak RSS (GiB)':24s}{gib(r['peak_rss_bytes']):12.2f}{gib(p['peak_rss_bytes']):12.2f}"
      f"{r['peak_rss_bytes'] / p['peak_rss_bytes']:9.2f}x  <= 0.7")
t_err = r["predicted_seconds_per_step"] / r["seconds_per_step"] - 1
print(f"plan's predicted step time {r['predicted_seconds_per_step']:.2f} s vs retort's {r['seconds_per_step']:.2f} s "
      f"({t_err:+.0%})")
err = r["predicted_bytes"] / r["peak_rss_bytes"] - 1
print(f"plan's predicted memory {gib(r['predicted_bytes']):.2f} GiB vs retort's peak "
      f"{gib(r['peak_rss_bytes']):.2f} GiB: {err:+.1%}  (goal within 15%)")
print("  prediction by part (GiB): " + ", ".join(f"{k} {gib(v):.2f}" for k, v in r["predicted"].items()))
l0r, l0p = r["losses"][0], p["losses"][0]
# bf16 rounds every activation: the two sides round at different points.
tol = 1e-4 if r.get("precision", "f32") == "f32" else 2e-3
ok = abs(l0r - l0p) <= tol * max(1.0, abs(l0p))
print(f"step-0 loss: retort {l0r:.6f}  peft {l0p:.6f}  |diff| {abs(l0r - l0p):.1e}  {'ok' if ok else 'MISMATCH'}")
print("losses: retort " + " ".join(f"{x:.5f}" for x in r["losses"]))
print("        peft   " + " ".join(f"{x:.5f}" for x in p["losses"]))
for name, d in (("retort", r), ("peft", p)):
    if d.get("profile"):
        parts = [f"{k[:-6]} {gib(v):.2f} GiB" if k.endswith("_bytes") else f"{k} {v:.2f}"
                 for k, v in d["profile"].items()]
        print(f"profile {name}: " + ", ".join(parts))
sys.exit(0 if ok else 1)
PY
