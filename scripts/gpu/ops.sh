#!/usr/bin/env bash
# The whole GPU op check in one command, run from the repository root on a GPU machine:
# op_check (every CUDA op against the CPU reference on random inputs), then op_bench (each op
# timed against the device's copy bandwidth and GEMM rate). Expects the binaries staged by
# scripts/gpu/stage.sh in gpu/bin/. Full logs go to $OUT (default /tmp/nanovllm-ops); the
# short tables are printed last. Exits non-zero when a check fails or a tool errors.
set -uo pipefail
cd "$(dirname "$0")/../.."

out="${OUT:-/tmp/nanovllm-ops}"
mkdir -p "$out"
for ex in op_check op_bench; do
    if [ ! -x "gpu/bin/$ex" ]; then
        echo "ops.sh: gpu/bin/$ex is missing; run scripts/gpu/stage.sh on the build machine" >&2
        exit 2
    fi
done

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
    | tee "$out/gpu.txt"
timeout "${OP_CHECK_TIMEOUT:-210}" gpu/bin/op_check 2>&1 | tee "$out/op_check.log"
check=${PIPESTATUS[0]}
# Decode attention again with the splits combined by their last CTA (off by default).
NANOVLLM_ATTN_FUSED_REDUCE=1 OP_CHECK_FILTER=decode_attention timeout 120 gpu/bin/op_check \
    >"$out/op_check_fused_reduce.log" 2>&1
fused=$?
timeout "${OP_BENCH_TIMEOUT:-120}" gpu/bin/op_bench 2>&1 | tee "$out/op_bench.log"
bench=${PIPESTATUS[0]}

echo
echo "===== op_check (exit $check; full log op_check.log)"
sed -n '/^op_check summary/,$p' "$out/op_check.log"
echo "===== op_check decode_attention, NANOVLLM_ATTN_FUSED_REDUCE=1 (exit $fused)"
grep -E '^op_check summary|decode_attention' "$out/op_check_fused_reduce.log" | tail -2
echo "===== op_bench (exit $bench; full log op_bench.log)"
grep '^ceiling' "$out/op_bench.log"
sed -n '/^op_bench summary/,$p' "$out/op_bench.log"
[ "$check" -eq 0 ] && [ "$fused" -eq 0 ] && [ "$bench" -eq 0 ]
