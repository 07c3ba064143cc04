#!/usr/bin/env python3
"""Writes the fixtures of `crates/retort-export/tests/fixtures/` from the reference implementations.

    python3 scripts/make_export_fixtures.py --llama-cpp DIR     # DIR: a llama.cpp source tree

What it writes (see tests/fixtures/README.md for the layout):

1. quant/: a fixed seeded f32 tensor and its encoding in every ggml type retort writes, from ggml's own
   reference quantizers (`quantize_row_*_ref` of `ggml/src/ggml-quants.c`, compiled here into a small
   shared library with gcc, without -march so no FMA is used, as llama.cpp builds ggml-base), checked
   against gguf-py's numpy quantizer for the types gguf-py can write; and the dequantized values of
   every type from gguf-py (SHA-256, plus a few values for readable failures).
2. models/<family>/: tiny random models of each family retort exports (hidden 64, 2 layers, a ~300
   token tokenizer), saved by transformers, each with a random PEFT adapter (LoRA, rsLoRA with rank and
   alpha patterns, or DoRA), the merged weights PEFT's `merge_and_unload` gives, and what llama.cpp's
   own `convert_hf_to_gguf.py` writes for the merged model (metadata values, tensor names, shapes,
   types and SHA-256 of the data) for F32, F16, BF16 and Q8_0.

Versions are pinned below and checked: other versions may write different (still valid) bytes.
Everything is seeded; running it twice gives identical files. Needs: torch, transformers, peft,
safetensors, gguf, sentencepiece, tokenizers, numpy (the versions below) and gcc.

The llama.cpp tree: `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36` and unpack
`vendor/llama.cpp` from it (llama.cpp commit 0c1e57098, the one shared/assets was taken from). Nothing
of llama.cpp is copied into the repository: only the small outputs above.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "peft": "0.21.2",
    "gguf": "0.19.0",
    "safetensors": "0.8.0",
    "sentencepiece": "0.2.3",
    "tokenizers": "0.23.3",
    "numpy": "2.4.6",
}

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "retort-export" / "tests" / "fixtures"


def check_versions() -> None:
    from importlib.metadata import version

    bad = [f"{k} {version(k)} (want {v})" for k, v in PINNED.items() if version(k) != v]
    if bad:
        sys.exit("pinned versions differ: " + ", ".join(bad))


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------------------------------------
# 1. Quantizer references
# ---------------------------------------------------------------------------------------------------

STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
const char * ggml_type_name(int t) { (void)t; return "?"; }
size_t ggml_type_size(int t) { (void)t; return 0; }
size_t ggml_row_size(int t, int64_t n) { (void)t; (void)n; return 0; }
"""

# (name, ggml id, block elements, block bytes, has a gguf-py quantizer)
TYPES = [
    ("Q4_0", 2, 32, 18, True),
    ("Q4_1", 3, 32, 20, True),
    ("Q5_0", 6, 32, 22, True),
    ("Q5_1", 7, 32, 24, True),
    ("Q8_0", 8, 32, 34, True),
    ("Q4_K", 12, 256, 144, False),
    ("Q5_K", 13, 256, 176, False),
    ("Q6_K", 14, 256, 210, False),
    ("Q8_K", 15, 256, 292, False),
]


def cname(name: str) -> str:
    """ggml's function-name spelling: q4_0, q4_K."""
    return name.lower().replace("_k", "_K")


def build_reference(llama_cpp: Path, work: Path) -> ctypes.CDLL:
    ggml = llama_cpp / "ggml"
    src = ggml / "src" / "ggml-quants.c"
    if not src.is_file():
        sys.exit(f"{src} not found: --llama-cpp must point at a llama.cpp source tree")
    (work / "stubs.c").write_text(STUBS)
    lib = work / "libqref.so"
    cmd = [
        "gcc", "-O2", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off",
        "-I", str(ggml / "include"), "-I", str(ggml / "src"),
        str(src), str(work / "stubs.c"), "-lm", "-o", str(lib),
    ]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(lib))


def quant_input() -> np.ndarray:
    """16 rows of 512: weights-like noise plus the edge cases quantizers get wrong."""
    rng = np.random.default_rng(20240607)
    x = rng.normal(0.0, 0.02, size=(16, 512)).astype(np.float32)
    x[1] = 0.0  # all zero
    x[2] = 0.125  # constant
    x[3] = rng.normal(0.0, 1.0, 512) * (rng.random(512) < 0.02) * 50  # sparse outliers
    x[4] = np.abs(x[4])  # all positive (min > 0)
    x[5] = -np.abs(x[5])  # all negative
    x[6] = rng.normal(0.0, 1e-20, 512)  # tiny
    x[7] = rng.normal(0.0, 1e3, 512)  # large
    x[8, :256] = 0.0  # one zero super-block next to a normal one
    x[9] = np.linspace(-1, 1, 512)  # ramp: many ties in rounding
    x[10] = np.round(x[10] * 1000) / 1000  # quantized-looking values
    x[11, ::2] = 0.0  # every other value zero
    x[12, :32] = 1.0  # a constant 32-block inside noise
    return x.astype(np.float32)


def check_gguf_py(x: np.ndarray, name: str, blocks: bytes, ts: int) -> None:
    """gguf-py must give ggml's bytes, except for the sign of a zero scale or min: ggml computes the
    scale of an all-zero block as `0 / -8 = -0.0` (f16 0x8000) and takes the first of equal zeros as
    the min, where numpy gives +0.0. Both decode to the same values; the Rust quantizers follow ggml."""
    import gguf

    def unsign(b: bytes) -> np.ndarray:
        a = np.frombuffer(b, np.uint8).reshape(-1, ts).copy()
        fields = [0, 2] if name.endswith("_1") else [0]
        for f in fields:
            neg_zero = (a[:, f] == 0) & (a[:, f + 1] == 0x80)
            a[neg_zero, f + 1] = 0
        return a

    mine = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, name)).tobytes()
    assert np.array_equal(unsign(mine), unsign(blocks)), f"gguf-py and ggml disagree on {name}"


def make_quant(llama_cpp: Path) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    out = OUT / "quant"
    out.mkdir(parents=True, exist_ok=True)
    x = quant_input()
    (out / "input.f32").write_bytes(x.tobytes())
    expected: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_reference(llama_cpp, Path(tmp))
        flat = np.ascontiguousarray(x.reshape(-1))
        for name, _id, bs, ts, py in TYPES:
            n = flat.size
            buf = (ctypes.c_uint8 * (n // bs * ts))()
            fn = getattr(lib, f"quantize_row_{cname(name)}_ref")
            fn(flat.ctypes.data_as(ctypes.c_void_p), buf, ctypes.c_int64(n))
            blocks = bytes(buf)
            if py:
                check_gguf_py(x, name, blocks, ts)
            deq = (ctypes.c_float * n)()
            getattr(lib, f"dequantize_row_{cname(name)}")(buf, deq, ctypes.c_int64(n))
            deq_c = np.frombuffer(bytes(deq), dtype=np.float32)
            if name != "Q8_K":
                rows = np.frombuffer(blocks, dtype=np.uint8).reshape(x.shape[0], -1)
                deq_py = gguf.quants.dequantize(rows, getattr(Q, name)).astype(np.float32).reshape(-1)
                assert deq_py.tobytes() == deq_c.tobytes(), f"gguf-py and ggml dequantize {name} differently"
            (out / f"{name}.bin").write_bytes(blocks)
            expected[name] = {
                "blocks_sha256": sha256(blocks),
                "dequant_sha256": sha256(deq_c.tobytes()),
                "dequant_first": [float(v) for v in deq_c[:4]],
            }
        for name, q in [("F16", Q.F16), ("BF16", Q.BF16)]:
            b = gguf.quants.quantize(x, q).tobytes()
            expected[name] = {"blocks_sha256": sha256(b)}
    meta = {"shape": list(x.shape), "types": expected}
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"quant fixtures: {len(expected)} types")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree")
    ap.add_argument("--only", choices=["quant", "models"], help="write one part only")
    args = ap.parse_args()
    check_versions()
    if args.only in (None, "quant"):
        make_quant(args.llama_cpp)
    if args.only in (None, "models"):
        from make_export_models import make_models  # noqa: PLC0415  (second half, same directory)

        make_models(args.llama_cpp, OUT)


if __name__ == "__main__":
    # Set iteration order (peft writes target_modules from a set) is fixed only with a fixed hash seed,
    # which must be set before the interpreter starts.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
