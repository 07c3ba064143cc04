#!/usr/bin/env bash
# Benchmark of `retort distill` against the fake teacher (`mock_teacher`) run as a process on this
# machine; nothing leaves the loopback interface. Three measurements, each the whole pipeline
# (inputs, templates, cache lookups, journal writes and fsyncs, outputs):
#
#   (a) a zero-latency server: sustained requests/s with retort pinned to one core (goal >= 1000)
#   (b) 200 ms latency, max_concurrency 64: throughput vs the ideal 64 / 0.2 s = 320 req/s
#       (goal: within 10%)
#   (c) a server enforcing 600 requests per minute: retort never exceeds it (the server's count over
#       any 60 s window) and stays above 95% of it
#
# Usage: scripts/bench_distill.sh [a|b|c ...]      (default: all three)
# Sizes: BENCH_A_REQUESTS (default 20000), BENCH_B_REQUESTS (4800), BENCH_C_REQUESTS (700).
# Needs: cargo, python3, taskset. Takes about three minutes after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."

A_REQUESTS=${BENCH_A_REQUESTS:-20000}
B_REQUESTS=${BENCH_B_REQUESTS:-4800}
C_REQUESTS=${BENCH_C_REQUESTS:-700}
WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(a b c)

cargo build --release --locked --quiet -p retort-cli --bin retort
cargo build --release --locked --quiet -p retort-teacher --features mock --example mock_teacher
RETORT=$PWD/target/release/retort
MOCK=$PWD/target/release/examples/mock_teacher
CORES=$(nproc)
# The server gets its own core when there is one, so that (a) measures retort, not the fake.
if [ "$CORES" -ge 2 ]; then SERVER_CPU=1; else SERVER_CPU=0; fi

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

start_server() { # args for mock_teacher; sets URL and SERVER_PID
    taskset -c "$SERVER_CPU" "$MOCK" "$@" >"$WORK/url" &
    SERVER_PID=$!
    for _ in $(seq 100); do
        [ -s "$WORK/url" ] && break
        sleep 0.05
    done
    URL=$(head -n1 "$WORK/url")
    [ -n "$URL" ] || { echo "error: mock_teacher did not start" >&2; exit 2; }
}

stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

make_case() { # dir requests teacher-extra
    local dir=$1 n=$2 extra=$3
    mkdir -p "$dir"
    python3 - "$dir/inputs.jsonl" "$n" <<'PY'
import sys
path, n = sys.argv[1], int(sys.argv[2])
topics = ["login", "billing", "export", "search", "invoices", "the mobile app", "notifications"]
with open(path, "w") as f:
    for i in range(n):
        f.write('{"id": "r%d", "text": "Request %d: %s fails after step %d of %d"}\n'
                % (i, i, topics[i % len(topics)], i % 13, i % 17 + 13))
PY
    cat >"$dir/recipe.toml" <<EOF
[project]
name = "bench"
seed = 1
data_dir = "out"

[base]
model = "builtin:tiny-llama"

[teacher]
provider = "openai-compatible"
model = "mock"
base_url = "$URL/v1"
timeout = "30s"
max_tokens = 64
$extra

[distill]
system_prompt = "Summarise the request in one sentence."
target_examples = $n

[distill.inputs]
from = "file"
path = "inputs.jsonl"
field = "text"
EOF
}

run_case() { # dir [taskset cpu]; prints "sent wall_s"
    local dir=$1 cpu=${2:-}
    local start end
    start=$(date +%s.%N)
    if [ -n "$cpu" ]; then
        (cd "$dir" && taskset -c "$cpu" "$RETORT" -q distill recipe.toml >/dev/null 2>"$dir/stderr") \
            || { cat "$dir/stderr" >&2; exit 2; }
    else
        (cd "$dir" && "$RETORT" -q distill recipe.toml >/dev/null 2>"$dir/stderr") \
            || { cat "$dir/stderr" >&2; exit 2; }
    fi
    end=$(date +%s.%N)
    python3 - "$dir/out/distill.json" "$start" "$end" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
print(r["requests"]["sent"], "%.3f" % wall)
PY
}

stats() { python3 -c 'import json,sys,urllib.request; s=json.load(urllib.request.urlopen(sys.argv[1]+"/stats")); print(s["answered"], s["max_per_minute"], s["rejected_rpm"])' "$URL"; }

ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

echo "retort distill benchmark: $(date -u +%Y-%m-%dT%H:%MZ), $CORES cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"

for w in "${WHICH[@]}"; do
    case $w in
    a)
        start_server --latency-ms 0
        make_case "$WORK/a" "$A_REQUESTS" "max_concurrency = 32"
        read -r sent wall < <(run_case "$WORK/a" 0)
        rate=$(python3 -c "print('%.0f' % ($sent / $wall))")
        echo "(a) zero latency, retort on one core: $sent requests in ${wall}s = $rate req/s; goal 1000 req/s: ratio $(ratio "$rate" 1000)"
        # The same run again: every answer from the cache and journal.
        read -r sent2 wall2 < <(run_case "$WORK/a" 0)
        echo "    rerun from the cache: $A_REQUESTS answers in ${wall2}s ($sent2 sent)"
        stop_server
        ;;
    b)
        start_server --latency-ms 200
        make_case "$WORK/b" "$B_REQUESTS" "max_concurrency = 64"
        read -r sent wall < <(run_case "$WORK/b")
        rate=$(python3 -c "print('%.1f' % ($sent / $wall))")
        echo "(b) 200 ms latency, concurrency 64: $sent requests in ${wall}s = $rate req/s; ideal 320 req/s: ratio $(ratio "$rate" 320) (goal >= 0.90)"
        stop_server
        ;;
    c)
        start_server --rpm 600
        make_case "$WORK/c" "$C_REQUESTS" "max_concurrency = 16
requests_per_minute = 600"
        read -r sent wall < <(run_case "$WORK/c")
        read -r answered max_minute rejected < <(stats)
        rate=$(python3 -c "print('%.2f' % ($sent / $wall * 60))")
        echo "(c) server limit 600 RPM: $sent requests in ${wall}s = $rate per minute; most in any 60 s window: $max_minute (limit 600: ratio $(ratio "$max_minute" 600)), turned away with 429: $rejected; sustained vs limit: ratio $(ratio "$rate" 600) (goal >= 0.95, never above 1)"
        stop_server
        ;;
    *)
        echo "error: unknown measurement \`$w\` (expected a, b or c)" >&2
        exit 1
        ;;
    esac
done
