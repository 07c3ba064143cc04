"""Sums cubecl's kernel profile by kernel, per training step, from the stderr of a `bench_train` run made
with cubecl's profiling logger on stderr (`scripts/bench_gpu.sh` does this with PROFILE_KERNELS=1).

    python3 scripts/cubecl_profile.py STDERR_LOG [--top 30]

cubecl writes one line per kernel it timed, `| 1.234ms | KernelName_hash`, plus summary tables at each
device sync; bench_train writes `bench_train: step N: ...` when step N ends. The kernel lines between
two step lines are that step's (cubecl logs from a background task, so a few may land one step late).
Prints, for each step, the kernel time summed against the step's wall time, then the top kernels of
the last step by total time, with their counts. With cubecl's compilation (basic) and autotune
(minimal) loggers on stderr too, it counts the kernels compiled and the keys autotuned in each step. Kernel time well under wall time means the GPU waits
on the host: launches, compilation, autotuning or reads back.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
KERNEL = re.compile(r"^\| ([0-9.]+)(ns|µs|us|ms|s)\s*\| (\S+)\s*$")
COMPILED = "[Compiling kernel]"
TUNED = "Fastest result"
STEP = re.compile(r"^bench_train: step (\d+): .* in ([0-9.]+)s")


def family(name: str) -> str:
    """`ElemwiseFuse_dfa05e48` -> `ElemwiseFuse`: the hash tells compiled variants apart."""
    return re.sub(r"_[0-9a-f]{6,}$", "", name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    steps: list[tuple[int, float, dict[str, list[float]], int, int]] = []
    current: dict[str, list[float]] = defaultdict(list)
    compiled = tuned = 0
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = KERNEL.match(line)
            if m:
                current[m.group(3)].append(float(m.group(1)) * UNITS[m.group(2)])
                continue
            compiled += line.startswith(COMPILED)
            tuned += line.startswith(TUNED)
            m = STEP.match(line)
            if m:
                steps.append((int(m.group(1)), float(m.group(2)), current, compiled, tuned))
                current = defaultdict(list)
                compiled = tuned = 0
    if not steps:
        print("no `bench_train: step` lines: the run ended before its first step")
        return
    for n, wall, kernels, compiled, tuned in steps:
        total = sum(sum(v) for v in kernels.values())
        launches = sum(len(v) for v in kernels.values())
        print(f"step {n}: wall {wall:.3f}s, kernels {total:.3f}s ({total / wall:.0%}), {launches} launches, "
              f"{len(kernels)} distinct kernels, {compiled} compiled, {tuned} autotuned")
    n, wall, kernels = steps[-1][:3]
    total = sum(sum(v) for v in kernels.values()) or 1.0
    print(f"\nstep {n} by kernel family:")
    fam: dict[str, list[float]] = defaultdict(list)
    for k, v in kernels.items():
        fam[family(k)].extend(v)
    for k, v in sorted(fam.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"  {sum(v) * 1e3:10.2f} ms {sum(v) / total:6.1%} {len(v):7d}x  {k}")
    print(f"\nstep {n} top kernels:")
    for k, v in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"  {sum(v) * 1e3:10.2f} ms {sum(v) / total:6.1%} {len(v):7d}x  mean {sum(v) / len(v) * 1e6:9.1f} us  {k}")


if __name__ == "__main__":
    main()
