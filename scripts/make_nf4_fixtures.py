#!/usr/bin/env python3
"""Writes the NF4 parity fixtures: small seeded tensors quantized by bitsandbytes itself, on the CPU, with
the packed codes, the absmax (plain and double-quantized) and the dequantized values it computes.

    python3 -m venv /work/venv-bnb
    /work/venv-bnb/bin/pip install bitsandbytes==0.50.2 torch==2.15.0 numpy==2.4.6
    /work/venv-bnb/bin/python scripts/make_nf4_fixtures.py   # rewrites crates/retort-lora/tests/fixtures/

Reference versions (checked at start; other versions may quantize differently):
    bitsandbytes==0.50.2  torch==2.15.0  numpy==2.4.6

What the reference is, exactly:
- `bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics, quant_type="nf4")` on CPU
  tensors. Its 4-bit step is bitsandbytes' pure-PyTorch kernel; its 8-bit step (the double quantization
  of the absmax) is the native `libbitsandbytes_cpu` kernel, so the script refuses to run when that
  library did not load (the PyTorch fallback rounds some absmax codes differently).
- The double-quantization offset is `absmax.mean()`, a PyTorch f32 reduction whose rounding depends on
  the vector width and the thread count. The script pins both (`ATEN_CPU_CAPABILITY=avx2`, one thread),
  which is why it only runs on x86-64.
- Dequantized values are bitsandbytes' pure-PyTorch `dequantize_4bit` (flat blocks, as on CUDA). The
  native CPU kernel is also run and any disagreement is printed: on AVX-512 machines it indexes absmax
  per row and is wrong for rows whose length is a multiple of 16 but not of the blocksize.

Everything is seeded and the files are written byte for byte by this script (no safetensors package):
rerunning gives identical files.
"""

import json
import os
import platform
import sys
from pathlib import Path

# Must be set before torch is imported: the f32 sum behind the double-quant offset uses 8-wide vectors
# with AVX2 (and in the plain C++ build) but 16-wide with AVX-512, and the two round differently.
os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
# bitsandbytes wraps its PyTorch dequantization in torch.compile; eager mode computes the same products
# without a compiler toolchain and without recompilation warnings.
os.environ["TORCHDYNAMO_DISABLE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib  # noqa: E402

PINNED = {"bitsandbytes": "0.50.2", "torch": "2.15.0", "numpy": "2.4.6"}

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "retort-lora" / "tests" / "fixtures"
SEED = 20240523
f32 = np.float32


def check_environment():
    found = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__.split("+")[0],
        "numpy": np.__version__,
    }
    wrong = {k: v for k, v in found.items() if v != PINNED[k]}
    if wrong:
        sys.exit(f"error: pinned versions {PINNED}, found {found}")
    if platform.machine() not in ("x86_64", "AMD64"):
        sys.exit("error: run on x86-64 (the double-quant offset depends on PyTorch's vector width)")
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        sys.exit("error: libbitsandbytes_cpu did not load; the absmax codes would come from another kernel")
    torch.set_num_threads(1)
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "DEFAULT"):
        sys.exit(f"error: PyTorch runs with {torch.backends.cpu.get_cpu_capability()}, expected AVX2")


# ---------------------------------------------------------------------------------------------------
# Inputs


def straddling_values(rng, count):
    """An absmax and values x <= absmax whose NF4 code differs between x * (1 / absmax) and x / absmax:
    the 4-bit kernel multiplies by the reciprocal in full blocks and divides in the last, partial one."""
    while True:
        amax = f32(rng.uniform(0.5, 2.0))
        found = straddling_for(amax)
        if len(found) >= count:
            rng.shuffle(found)
            return amax, np.array(found[:count], dtype=f32)


def straddling_for(amax):
    code = F.get_4bit_type("nf4", device="cpu").numpy()
    bounds = ((code[:-1] + code[1:]) / f32(2)).astype(f32)
    inv = f32(1) / amax
    out = []
    for b in bounds:
        below = above = f32(b * amax)
        for _ in range(64):
            hit = [x for x in (below, above)
                   if abs(x) <= amax and np.searchsorted(bounds, f32(x * inv)) != np.searchsorted(bounds, f32(x / amax))]
            if hit:
                out.append(hit[0])
                break
            below, above = np.nextafter(below, f32(-2)), np.nextafter(above, f32(2))
    return out


def edge_input(rng):
    """One row of hand-placed blocks (blocksize 64) and an odd-length partial block."""
    code = F.get_4bit_type("nf4", device="cpu").numpy()
    bounds = ((code[:-1] + code[1:]) / f32(2)).astype(f32)
    blocks = []
    # 0: all zeros (absmax 0, every code is the zero code).
    blocks.append(np.zeros(64, f32))
    # 1: every decision threshold exactly, and one ulp either side, with absmax exactly 1.
    ties = np.concatenate([bounds, np.nextafter(bounds, f32(2)), np.nextafter(bounds, f32(-2)), [f32(1)]])
    blocks.append(np.concatenate([ties, rng.uniform(-1, 1, 64 - len(ties))]).astype(f32))
    # 2: subnormals only (absmax below the 1e-38 clamp bitsandbytes applies before the reciprocal).
    blocks.append((rng.standard_normal(64) * 1e-40).astype(f32))
    # 3: a single non-zero value.
    b = np.zeros(64, f32)
    b[17] = f32(-3.5)
    blocks.append(b)
    # 4: values that round across a threshold if divided instead of multiplied by the reciprocal.
    amax, s = straddling_values(rng, 8)
    blocks.append(np.concatenate([[amax], s, rng.uniform(-amax, amax, 64 - 1 - len(s))]).astype(f32))
    # 5: near the top of the f32 range (the reciprocal of absmax is subnormal).
    blocks.append((rng.uniform(-1, 1, 64) * 3.0e38).astype(f32))
    # tail, 33 values: straddling values again, now in the partial block where bitsandbytes divides.
    amax, s = straddling_values(rng, 8)
    blocks.append(np.concatenate([[-amax], s, rng.uniform(-amax, amax, 33 - 1 - len(s))]).astype(f32))
    return np.concatenate(blocks).reshape(1, -1)


def zeros_input(rng):
    """Normal values with 30% exact zeros, one all-zero block and an all-zero partial last block (whose
    absmax bitsandbytes stores clamped to 1e-38 while a full zero block keeps 0)."""
    x = rng.standard_normal(350).astype(f32)
    x[rng.random(350) < 0.3] = 0
    x[64:128] = 0
    x[320:] = 0
    return x.reshape(7, 50)


def near_mean_input(rng):
    """260 blocks of 32 whose absmax crowd around their mean, so that most centred values the 8-bit step
    codes lie within a few 65536ths of zero, where bitsandbytes' CPU table and a nearest-value search of
    the dynamic map disagree; every seventh absmax is spread over the range instead."""
    blocks, bs = 260, 32
    spread = np.zeros(blocks, bool)
    spread[::7] = True
    target = np.empty(blocks)
    target[spread] = rng.uniform(0.0, 2.0, spread.sum())
    target[0], target[7] = 2.0, 0.0
    # The crowd is m + jitter where m is the mean of everything: m * blocks = spread sum + crowd * m +
    # jitter sum, so m = (spread sum + jitter sum) / spread count.
    jitter = rng.standard_normal(blocks - spread.sum()) * 3e-5
    target[~spread] = (target[spread].sum() + jitter.sum()) / spread.sum() + jitter
    x = rng.uniform(-0.9, 0.9, (blocks, bs)) * target[:, None]
    x[np.arange(blocks), rng.integers(0, bs, blocks)] = target * rng.choice([-1.0, 1.0], blocks)
    return x.astype(f32)


def nearest_dynamic_codes(centred, scales):
    """What a search of the dynamic map would give (bitsandbytes' CUDA rule), for the comparison only."""
    code = F.create_dynamic_map().numpy()
    mid = ((code[:-1] + code[1:]) * f32(0.5)).astype(f32)
    scale = np.repeat(scales, 256)[: len(centred)]
    inv = (f32(1) / np.where(scale == 0, f32(1), scale)).astype(f32)
    codes = np.searchsorted(mid, np.clip((centred * inv).astype(f32), -1, 1), side="left")
    return np.where(scale == 0, 0, codes)


def to_bf16(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=f32)).to(torch.bfloat16)


def to_f16(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=f32)).to(torch.float16)


def cases():
    rng = np.random.default_rng(SEED)
    # Weight-like: std 0.02 with a few outlier columns, as in real checkpoints.
    big = rng.standard_normal((131, 127)) * 0.02
    big[:, rng.choice(127, 3, replace=False)] *= 25
    heavy = rng.standard_t(2, size=(40, 100)) * 0.1
    return [
        ("normal", "f32 N(0,1), 64 whole blocks", torch.from_numpy(rng.standard_normal((32, 128)).astype(f32)),
         [(64, False), (64, True)]),
        ("heavy_tailed", "f32 Student-t(2) * 0.1; 4000 values, so the last block holds 32",
         torch.from_numpy(heavy.astype(f32)), [(64, False), (64, True)]),
        ("zeros", "f32 with exact zeros, an all-zero block and an all-zero partial last block",
         torch.from_numpy(zeros_input(rng)), [(64, False), (64, True)]),
        ("bf16_weights", "bf16 weight-like values with outlier columns; 16637 values: 260 blocks (a partial "
         "one of 61, an odd count so the last byte holds a pad code) and 2 absmax blocks (256 + 4)",
         to_bf16(big), [(64, True)]),
        ("f16_blocksizes", "f16 N(0,1) * 0.5 quantized with blocksizes 32, 128 and 4096 (one partial block)",
         to_f16(rng.standard_normal((12, 96)) * 0.5), [(32, True), (128, False), (4096, True)]),
        ("rows_of_80", "f32 rows of 80: a multiple of 16 but not of 64 (bitsandbytes' native AVX-512 "
         "dequantization indexes absmax per row and disagrees here)",
         torch.from_numpy(rng.standard_normal((6, 80)).astype(f32)), [(64, True)]),
        ("edge", "f32 hand-placed blocks: zeros, exact thresholds, subnormals, one non-zero, values that "
         "round differently when divided, values near f32 max, an odd partial block",
         torch.from_numpy(edge_input(rng)), [(64, False), (64, True)]),
        ("absmax_near_mean", "f32, blocksize 32, 260 blocks whose absmax crowd around their mean: the "
         "double quantization's 8-bit codes come from bitsandbytes' 65536-bin CPU table, not a search",
         torch.from_numpy(near_mean_input(rng)), [(32, True)]),
        ("constant", "f32 all 0.5: every absmax equals the mean, so every double-quant block is zero",
         torch.full((4, 64), 0.5, dtype=torch.float32), [(64, True)]),
        ("single", "one f32 value", torch.tensor([[-0.25]], dtype=torch.float32), [(64, False), (64, True)]),
    ]


# ---------------------------------------------------------------------------------------------------
# Reference quantization


def reference(x, blocksize, double):
    q, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double, quant_type="nf4")
    code = F.get_4bit_type("nf4", device="cpu")
    out = {"codes": q.reshape(-1).numpy()}
    if double:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        out["absmax_codes"] = state.absmax.numpy()
        plain = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")[1].absmax
        searched = nearest_dynamic_codes((plain - state.offset).numpy(), state.state2.absmax.numpy())
        differ = int((searched != out["absmax_codes"]).sum())
        if differ:
            print(f"  note: {differ} of {len(searched)} absmax codes differ from what a search of the map gives")
        out["absmax_scales"] = state.state2.absmax.numpy()
        out["absmax_offset"] = state.offset.reshape(1).numpy()
        assert torch.equal(state.state2.code, F.create_dynamic_map())
        assert state.state2.blocksize == 256
    else:
        absmax = state.absmax
    out["absmax"] = absmax.numpy()
    flat = _dequantize_4bit_compute(q.reshape(-1), absmax, code, blocksize, tuple(x.shape), torch.float32)
    out["dequant"] = flat.reshape(-1).numpy()

    # The public entry point (native kernel where one applies) should agree; a difference is reported.
    state.dtype = torch.float32  # dequantize to f32 whatever the input dtype
    native = F.dequantize_4bit(q, state).reshape(-1)
    if not torch.equal(native, flat.reshape(-1)):
        bad = int((native != flat.reshape(-1)).sum())
        print(f"  note: bitsandbytes' native CPU dequantize_4bit differs from its PyTorch one in {bad} values "
              f"(shape {tuple(x.shape)}, blocksize {blocksize}); the fixture keeps the PyTorch one")
    if x.dtype != torch.float32:
        # Dequantizing to the input dtype rounds the f32 values to nearest even.
        low = _dequantize_4bit_compute(q.reshape(-1), absmax, code, blocksize, tuple(x.shape), x.dtype)
        assert torch.equal(low, flat.to(x.dtype))
        out["dequant_" + {torch.bfloat16: "bf16", torch.float16: "f16"}[x.dtype]] = low.reshape(-1)
    return out


# ---------------------------------------------------------------------------------------------------
# A minimal, deterministic safetensors writer.

DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8", torch.bfloat16: "BF16", torch.float16: "F16"}


def raw(t):
    if isinstance(t, torch.Tensor):
        if t.dtype in (torch.bfloat16, torch.float16):
            return DTYPES[t.dtype], list(t.shape), t.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        t = t.numpy()
    t = np.ascontiguousarray(t)
    return DTYPES[t.dtype], list(t.shape), t.astype(t.dtype.newbyteorder("<")).tobytes()


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        dtype, shape, data = raw(tensors[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


# ---------------------------------------------------------------------------------------------------
# The double-quant offset alone: PyTorch's f32 mean over lengths that exercise every level of its
# cascade sum, on values both sides can generate (SplitMix64 of the index), so only the means are stored.

MEAN_LENGTHS = list(range(1, 71)) + [96, 127, 128, 255, 256, 257, 511, 512, 513, 1000, 4095, 4096, 4097,
                                     8191, 8192, 8193, 10007, 32767, 65537, 131077, 1_000_003, 16_777_259]


def splitmix_values(n):
    """Non-negative f32 with 24 random mantissa bits and exponents 2^-3..2^4, like a tensor's absmax:
    value i is made from SplitMix64(n * 2^32 + i)."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(n << 32)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    mantissa = (z >> np.uint64(40)).astype(np.float32) * f32(2.0**-24)
    exponent = ((z >> np.uint64(8)) & np.uint64(7)).astype(np.int32) - 3
    return np.ldexp(mantissa, exponent).astype(f32)


def write_means():
    cases = []
    for n in MEAN_LENGTHS:
        mean = torch.from_numpy(splitmix_values(n)).mean()
        cases.append({"len": n, "mean_bits": int(mean.view(torch.int32).item()) & 0xFFFFFFFF})
    head = {
        "what": "torch.Tensor.mean() of splitmix_values(len) in scripts/make_nf4_fixtures.py, as f32 bits",
        "reference": f"torch=={PINNED['torch']} on CPU (ATEN_CPU_CAPABILITY=avx2, 1 thread)",
    }
    lines = [f' "{k}": {json.dumps(v)},' for k, v in head.items()]
    lines += [' "cases": [', ",\n".join(f"  {json.dumps(c)}" for c in cases), " ]"]
    (OUT / "torch_mean.json").write_text("{\n" + "\n".join(lines) + "\n}\n")


def main():
    check_environment()
    OUT.mkdir(parents=True, exist_ok=True)
    provenance = (f"bitsandbytes=={PINNED['bitsandbytes']} torch=={PINNED['torch']} on CPU "
                  "(ATEN_CPU_CAPABILITY=avx2, 1 thread), scripts/make_nf4_fixtures.py")

    tables = {"nf4": F.get_4bit_type("nf4", device="cpu").numpy(), "dynamic": F.create_dynamic_map().numpy()}
    write_safetensors(OUT / "tables.safetensors", tables, {"reference": provenance})

    write_means()

    total = 0
    for name, description, x, variants in cases():
        tensors = {"input": x}
        for blocksize, double in variants:
            prefix = f"bs{blocksize}.{'double' if double else 'plain'}."
            for key, value in reference(x, blocksize, double).items():
                tensors[prefix + key] = value
        metadata = {
            "description": description,
            "variants": ",".join(f"{bs}:{'double' if d else 'plain'}" for bs, d in variants),
            "reference": provenance,
        }
        path = OUT / f"{name}.safetensors"
        write_safetensors(path, tensors, metadata)
        total += path.stat().st_size
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
