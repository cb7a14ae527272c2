#!/usr/bin/env bash
# Cold start to ready (process start -> engine ready: dummy Qwen3-0.6B weights, KV cache,
# every decode CUDA graph captured) with the kernels loaded as sm_90 machine code and as PTX
# compiled by the driver. Run it first on a freshly started GPU machine: its first line is
# then the start a user sees the first time (nothing in the page cache or the driver's cache).
# Expects gpu/bin/nanovllm (scripts/gpu/stage.sh). Logs go to $OUT (default
# /tmp/nanovllm-coldstart); a table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/nanovllm-coldstart}"
mkdir -p "$out"
rows=()
status=0
run() { # label, env assignments...
    local label="$1"
    shift
    local t0 t1 f="$out/coldstart-${#rows[@]}.json"
    t0=$(date +%s.%N)
    if env "$@" gpu/bin/nanovllm bench --num-seqs 1 --min-input-len 16 --max-input-len 16 \
        --min-output-len 16 --max-output-len 16 --json >"$f" 2>"$f.err"; then
        t1=$(date +%s.%N)
        rows+=("$(printf '%-44s %8s s %10.2f s' "$label" \
            "$(python3 -c 'import json,sys; print(f"{json.load(open(sys.argv[1]))["cold_start_seconds"]:.2f}")' "$f")" \
            "$(python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$t0" "$t1")")")
        grep -m1 'kernels:' "$f.err" >>"$out/kernels.txt" || true
    else
        status=1
        rows+=("$(printf '%-44s failed (see %s)' "$label" "$f.err")")
        tail -5 "$f.err"
    fi
}
run "machine code (first process on this machine)"
run "PTX, driver cache off" NANOVLLM_CUBIN=0 CUDA_CACHE_DISABLE=1
run "machine code" CUDA_CACHE_DISABLE=1
run "PTX, driver cache off" NANOVLLM_CUBIN=0 CUDA_CACHE_DISABLE=1
run "machine code" CUDA_CACHE_DISABLE=1
echo "===== cold start (dummy Qwen3-0.6B, bench --num-seqs 1)"
printf '%-44s %10s %12s\n' "kernels" "to ready" "process"
printf '%s\n' "${rows[@]}"
sort -u "$out/kernels.txt" 2>/dev/null
exit "$status"
