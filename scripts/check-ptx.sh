#!/usr/bin/env bash
# CI check: every nanovllm-kernels/cuda/*.cu compiles with nvcc 13.0, the PTX shipped in
# nanovllm-kernels/ptx/ is exactly what it compiles to (comment lines, which name the compiler
# build, are ignored), and the sm_90 machine code in nanovllm-kernels/cubin/ is byte for byte
# what ptxas 13.0 makes of that PTX. Fix a failure with scripts/build-ptx.sh and commit both.
#
# nvcc 13.0: $NVCC, else .venv-nvcc, else a throwaway venv (pip) removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# shellcheck source=scripts/nvcc-13.sh
. scripts/nvcc-13.sh "$tmp" check-ptx

NVCC="$nvcc" scripts/build-ptx.sh "$tmp/ptx" "$tmp/cubin" 2>/dev/null

strip_comments() { grep -v '^[[:space:]]*//' "$1" || true; }
status=0
for src in nanovllm-kernels/cuda/*.cu; do
    stem=$(basename "$src" .cu)
    shipped="nanovllm-kernels/ptx/$stem.ptx"
    if [ ! -f "$shipped" ]; then
        echo "check-ptx: $shipped is missing (run scripts/build-ptx.sh)" >&2
        status=1
    elif ! diff -q <(strip_comments "$shipped") <(strip_comments "$tmp/ptx/$stem.ptx") >/dev/null; then
        echo "check-ptx: $shipped is stale: it differs from what nvcc 13.0 makes of $src (run scripts/build-ptx.sh)" >&2
        status=1
    fi
    cubin="nanovllm-kernels/cubin/$stem.sm_90.cubin"
    if [ ! -f "$cubin" ]; then
        echo "check-ptx: $cubin is missing (run scripts/build-ptx.sh)" >&2
        status=1
    elif ! cmp -s "$cubin" "$tmp/cubin/$stem.sm_90.cubin"; then
        echo "check-ptx: $cubin is stale: it differs from what ptxas 13.0 makes of $src's PTX (run scripts/build-ptx.sh)" >&2
        status=1
    fi
done
for ptx in nanovllm-kernels/ptx/*.ptx; do
    [ -e "$ptx" ] || continue
    if [ ! -e "nanovllm-kernels/cuda/$(basename "$ptx" .ptx).cu" ]; then
        echo "check-ptx: $ptx has no source in nanovllm-kernels/cuda/" >&2
        status=1
    fi
done
for cubin in nanovllm-kernels/cubin/*; do
    [ -e "$cubin" ] || continue
    if [ ! -e "nanovllm-kernels/cuda/$(basename "$cubin" .sm_90.cubin).cu" ]; then
        echo "check-ptx: $cubin has no source in nanovllm-kernels/cuda/" >&2
        status=1
    fi
done
[ "$status" -eq 0 ] && echo "check-ptx: shipped PTX and sm_90 machine code match the sources"
exit "$status"
