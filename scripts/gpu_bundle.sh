#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs, for a GPU machine that has no Rust toolchain: the two parity
# test executables and the bench_train, bench_nf4 and bench_attention examples, release, with
# `--features retort-model/vulkan`, stripped and xz-compressed (about 17 MB each instead of 745 MB)
# into OUT_DIR (default .devbin, which git ignores only if you add it to .git/info/exclude). On the GPU
# machine, with the repository at the same path as here (the parity suites read their fixtures from
# the path they were built at; a link does):
#   BUNDLE=.devbin scripts/gpu_check.sh
#
#   scripts/gpu_bundle.sh [OUT_DIR]
#
# The build takes about 33 min on 2 cores (burn with wgpu and the SPIR-V compiler); CARGO_TARGET_DIR
# defaults to a separate target/vulkan so the everyday CPU build is not rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.devbin}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/vulkan}
FEATURES=(--features retort-model/vulkan)
cargo build --release --locked -p retort-train --example bench_train "${FEATURES[@]}"
cargo build --release --locked -p retort-model --example bench_nf4 --example bench_attention "${FEATURES[@]}"
# The test executables' paths are in cargo's JSON messages; one per package here.
mapfile -t TESTS < <(cargo test --release --locked --no-run -p retort-model -p retort-train "${FEATURES[@]}" \
    --test parity --message-format json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "parity":
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1] + " " + m["executable"])')
mkdir -p "$OUT_DIR"
pack() { # NAME PATH
    strip -o "$OUT_DIR/$1" "$2"
    xz -9 -T0 -f "$OUT_DIR/$1"
    echo "$OUT_DIR/$1.xz: $(du -h "$OUT_DIR/$1.xz" | cut -f1)"
}
pack bench_train "$CARGO_TARGET_DIR/release/examples/bench_train"
pack bench_nf4 "$CARGO_TARGET_DIR/release/examples/bench_nf4"
pack bench_attention "$CARGO_TARGET_DIR/release/examples/bench_attention"
for t in "${TESTS[@]}"; do
    pack "parity-${t%% *}" "${t#* }"
done
