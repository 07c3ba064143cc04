#!/usr/bin/env bash
# Loads retort's GGUF outputs in llama.cpp itself and compares logits: for every fixture family,
# the merged GGUF (F32), and the base GGUF (F32) with retort's GGUF LoRA adapter applied by llama.cpp
# (`--lora`), must give the same next-token logits; and each Q8_0 / Q4_K_M file must load and run.
#
#     scripts/check_with_llama_cpp.sh LLAMA_CPP_SRC LLAMA_CPP_BUILD
#
# LLAMA_CPP_SRC: a llama.cpp source tree (for llama.h); LLAMA_CPP_BUILD: its cmake build directory
# with libllama and ggml built (e.g. `cmake -B build -DGGML_NATIVE=OFF && cmake --build build
# --target llama`). Compiles a small C program of retort's own against that build. Not run by CI
# (it needs a llama.cpp build); it is evidence that llama.cpp's loader and `--lora` accept the files.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(realpath "$1")
BUILD=$(realpath "$2")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat > "$WORK/check.c" <<'C'
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) data;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* Next-token logits after a fixed prompt; lora may be NULL. */
static float * logits(const char * model_path, const char * lora_path, int * n) {
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * m = llama_model_load_from_file(model_path, mp);
    if (!m) { fprintf(stderr, "llama.cpp cannot load %s\n", model_path); exit(1); }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64; cp.n_batch = 64; cp.n_threads = 2; cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(m, cp);
    if (!ctx) { fprintf(stderr, "no context for %s\n", model_path); exit(1); }
    if (lora_path) {
        struct llama_adapter_lora * a = llama_adapter_lora_init(m, lora_path);
        if (!a) { fprintf(stderr, "llama.cpp cannot load the LoRA %s\n", lora_path); exit(1); }
        float scale = 1.0f;
        if (llama_set_adapters_lora(ctx, &a, 1, &scale) != 0) { fprintf(stderr, "cannot apply %s\n", lora_path); exit(1); }
    }
    llama_token toks[8] = {1, 5, 9, 33, 120, 200, 17, 64};
    if (llama_decode(ctx, llama_batch_get_one(toks, 8)) != 0) { fprintf(stderr, "decode failed: %s\n", model_path); exit(1); }
    *n = llama_vocab_n_tokens(llama_model_get_vocab(m));
    float * out = malloc(sizeof(float) * *n);
    memcpy(out, llama_get_logits_ith(ctx, -1), sizeof(float) * *n);
    llama_free(ctx);
    llama_model_free(m);
    return out;
}

int main(int argc, char ** argv) {
    llama_log_set(quiet, NULL);
    llama_backend_init();
    if (argc == 2) { int n; free(logits(argv[1], NULL, &n)); printf("loaded and ran %s\n", argv[1]); return 0; }
    int n1, n2;
    float * a = logits(argv[1], NULL, &n1);
    float * b = logits(argv[2], argv[3], &n2);
    if (n1 != n2) { fprintf(stderr, "vocab %d vs %d\n", n1, n2); return 1; }
    float worst = 0;
    for (int i = 0; i < n1; i++) worst = fmaxf(worst, fabsf(a[i] - b[i]));
    printf("%s: max |merged - (base + lora)| = %g over %d logits\n", argv[1], worst, n1);
    return worst < 1e-3f ? 0 : 1;
}
C

LIBS=$(find "$BUILD" -name 'libllama*.so' -o -name 'libggml*.so' | xargs -n1 dirname | sort -u | sed 's/^/-L/' | tr '\n' ' ')
RPATH=$(find "$BUILD" -name 'libllama*.so' -o -name 'libggml*.so' | xargs -n1 dirname | sort -u | sed 's/^/-Wl,-rpath,/' | tr '\n' ' ')
# shellcheck disable=SC2086
gcc -O2 -o "$WORK/check" "$WORK/check.c" -I "$SRC/include" -I "$SRC/ggml/include" $LIBS $RPATH -lllama -lggml -lggml-base -lm

cargo build --quiet -p retort-cli
RETORT=$PWD/target/debug/retort
FIX=crates/retort-export/tests/fixtures/models
status=0
for fam in llama mistral qwen2 qwen3 phi3 gemma2 gemma3; do
  out=$WORK/$fam
  formats=(--format gguf:f32 --format gguf:q8_0 --format gguf:q4_k_m)
  case $fam in qwen3|gemma3) ;; *) formats+=(--format gguf-adapter) ;; esac
  "$RETORT" -q export --base "$FIX/$fam/base" --adapter "$FIX/$fam/adapter" --dtype f32 "${formats[@]}" --out "$out/merged" --name m >/dev/null
  "$RETORT" -q export --base "$FIX/$fam/base" --format gguf:f32 --out "$out/base" --name m >/dev/null
  "$WORK/check" "$out/merged/m-Q8_0.gguf" || status=1
  "$WORK/check" "$out/merged/m-Q4_K_M.gguf" || status=1
  if [ -f "$out/merged/m-lora-F32.gguf" ]; then
    "$WORK/check" "$out/merged/m-F32.gguf" "$out/base/m-F32.gguf" "$out/merged/m-lora-F32.gguf" || status=1
  else
    echo "$fam: DoRA adapter, no GGUF LoRA (retort refuses it); merged GGUF only"
    "$WORK/check" "$out/merged/m-F32.gguf" || status=1
  fi
done
exit $status
