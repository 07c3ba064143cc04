#!/usr/bin/env bash
# Everything to run on a machine with a GPU, in one go: the model and LoRA parity suites on the GPU
# (RETORT_TEST_DEVICE, default wgpu: Vulkan with the SPIR-V compiler), retort's GPU kernels against
# burn's tensor operations (bench_nf4: NF4 dequantization of Llama-3.1-8B's projections, bf16), the
# blockwise training attention against the decomposed form (bench_attention: Llama-3.2-1B's heads,
# bf16, 1k to 16k tokens, time and the device memory autodiff keeps), then scripts/bench_gpu.sh.
#
#   scripts/gpu_check.sh
#
# Where the GPU machine has no Rust toolchain, build on another x86-64 Linux machine and bring the
# executables (their fixture paths are compiled in: the repository must sit at the same path there,
# or a link to it):
#   cargo test --release --no-run -p retort-model -p retort-train --features retort-model/vulkan --test parity
#   cargo build --release -p retort-train --example bench_train --features retort-model/vulkan
#   cargo build --release -p retort-model --example bench_nf4 --example bench_attention \
#       --features retort-model/vulkan
# and pass PARITY_BINS="path/to/parity-A path/to/parity-B", BENCH_TRAIN=path/to/bench_train,
# BENCH_NF4=path/to/bench_nf4 and BENCH_ATTENTION=path/to/bench_attention; or
# pack them with scripts/gpu_bundle.sh and pass BUNDLE=its output folder.
# SKIP_TESTS=1 or SKIP_BENCH=1 leaves one part out; TEST_TIMEOUT=seconds bounds each prebuilt suite.
# LONG=1 adds one 8B QLoRA step on one row of LONG_SEQ tokens (default 78475, Unsloth's 24 GB figure)
# with the checkpointed layer inputs in host memory; its peak device memory is the number to compare
# with 24 GB and with `retort inspect model` (LONG_SKIP_PEFT=0 runs PEFT on it too).
set -uo pipefail
cd "$(dirname "$0")/.."
export RETORT_TEST_DEVICE=${RETORT_TEST_DEVICE:-wgpu}
status=0
if [ -n "${BUNDLE:-}" ]; then
    unpacked=$(mktemp -d)
    for f in "$BUNDLE"/*.xz; do
        xz -dc "$f" >"$unpacked/$(basename "$f" .xz)"
        chmod +x "$unpacked/$(basename "$f" .xz)"
    done
    BENCH_TRAIN=$unpacked/bench_train
    BENCH_NF4=$unpacked/bench_nf4
    BENCH_ATTENTION=$unpacked/bench_attention
    PARITY_BINS=$(ls "$unpacked"/parity-*)
    export BENCH_TRAIN
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== parity suites on $RETORT_TEST_DEVICE"
    if [ -n "${PARITY_BINS:-}" ]; then
        for bin in $PARITY_BINS; do
            timeout "${TEST_TIMEOUT:-0}" "$bin" --test-threads 1 || status=1
        done
    else
        cargo test --release --locked -p retort-model -p retort-train --features retort-model/vulkan \
            --test parity -- --test-threads 1 || status=1
    fi
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo "== kernels against burn's tensor operations on $RETORT_TEST_DEVICE"
    if [ -n "${BENCH_NF4:-}" ]; then
        "$BENCH_NF4" "$RETORT_TEST_DEVICE:0" bf16 20 || status=1
    else
        cargo run --release --locked -p retort-model --features vulkan --example bench_nf4 -- \
            "$RETORT_TEST_DEVICE:0" bf16 20 || status=1
    fi
    if [ -n "${BENCH_ATTENTION:-}" ]; then
        "$BENCH_ATTENTION" "$RETORT_TEST_DEVICE:0" bf16 1024 4096 16384 || status=1
    else
        cargo run --release --locked -p retort-model --features vulkan --example bench_attention -- \
            "$RETORT_TEST_DEVICE:0" bf16 1024 4096 16384 || status=1
    fi
    scripts/bench_gpu.sh || status=1
    if [ "${LONG:-0}" = 1 ]; then
        # Unsloth's long-context figure: 8B QLoRA, one row of 78,475 tokens, offloaded checkpoints.
        echo "== long context: 8b qlora, 1 x ${LONG_SEQ:-78475} tokens, layer inputs in host memory"
        SHAPES=8b MODES=qlora ROWS=1 SEQ=${LONG_SEQ:-78475} OFFLOAD=1 SKIP_PEFT=${LONG_SKIP_PEFT:-1} \
            scripts/bench_gpu.sh || status=1
    fi
fi
exit $status
