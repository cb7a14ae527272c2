#!/usr/bin/env bash
# Checks the device side of programmatic dependent launch (nanovllm-kernels/cuda/pdl.cuh):
# disassembles every kernel's shipped sm_90 machine code (nanovllm-kernels/cubin/) and fails when a
# kernel touches global memory (a load, store or atomic) before its first `griddepcontrol.wait`
# (SASS `ACQBULK`), or never waits at all. The C source calls pdl_wait() first, but ptxas may
# still move a non-coherent load (`ld.global.nc`, what `const __restrict__` pointers become)
# above it, which would read the previous kernel's output before it is complete. Allowed before
# the wait: L2 prefetches (CCTL), and loads with the L1::no_allocate + L2::256B hints (SASS
# `LDG.E.NA.LTC256B`), the idiom gemv.cu uses for weights alone, which no kernel writes, and
# gemm_tma.cu's TMA loads (`UTMALDG`) of its first weight tiles (its x loads follow the wait).
#
# Usage: scripts/check-pdl.sh
# nvcc 13.0: $NVCC, else .venv-nvcc (scripts/build-ptx.sh), else a throwaway venv (pip); the
# cuobjdump and nvdisasm next to it, on PATH, or from pip into that venv.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# shellcheck source=scripts/nvcc-13.sh
. scripts/nvcc-13.sh "$tmp" check-pdl
pip_into="$nvcc_venv"
bindir=$(dirname "$nvcc")
export PATH="$bindir:$PATH"
if ! command -v cuobjdump >/dev/null || ! command -v nvdisasm >/dev/null; then
    if [ -z "$pip_into" ]; then
        python3 -m venv "$tmp/venv"
        pip_into="$tmp/venv"
    fi
    echo "check-pdl: installing cuobjdump and nvdisasm (pip)" >&2
    "$pip_into/bin/pip" install -q 'nvidia-cuda-cuobjdump==13.2.*' 'nvidia-cuda-nvdisasm==13.2.*'
    export PATH="$(dirname "$(ls "$pip_into"/lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump | head -n 1)"):$PATH"
fi
# The shipped machine code is what runs on sm_90 (scripts/check-ptx.sh checks it is what the
# sources make); a source without it is compiled here.
for src in nanovllm-kernels/cuda/*.cu; do
    stem=$(basename "$src" .cu)
    cubin="nanovllm-kernels/cubin/$stem.sm_90.cubin"
    if [ ! -f "$cubin" ]; then
        cubin="$tmp/$stem.cubin"
        flags=$(sed -n 's#^// nvcc-flags:##p' "$src" | head -n 1)
        # shellcheck disable=SC2086 # the flags are a word list
        "$nvcc" -cubin -arch=sm_90 -O3 -std=c++17 $flags -I nanovllm-kernels/cuda "$src" -o "$cubin"
    fi
    cuobjdump -sass "$cubin" >"$tmp/$stem.sass"
done
python3 - "$tmp"/*.sass <<'PY'
import re, sys
memory = re.compile(r"\b(LDG|STG|ATOMG|REDG|RED|ATOM|LDGSTS|UBLKCP|UTMALDG|UTMASTG|LD|ST)\b|\b(LDG|STG|ATOMG|LD|ST)\.")
bad, kernels = [], 0
for path in sys.argv[1:]:
    name, waited, early = None, False, []
    def done():
        if name is None:
            return
        if not waited:
            bad.append(f"{name}: never waits (no ACQBULK)")
        elif early:
            bad.append(f"{name}: {len(early)} memory instruction(s) before the wait, first: {early[0]}")
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            done()
            name, waited, early = m.group(1), False, []
            kernels += 1
            continue
        if name is None or not re.search(r"/\*[0-9a-f]{4}\*/", line):
            continue
        ins = line.split("*/", 1)[1].split(";")[0].strip()
        if "ACQBULK" in ins:
            waited = True
        elif (not waited and memory.search(ins) and "LDG.E.NA.LTC256B" not in ins
              and not (name.startswith("gemm_tma") and "UTMALDG" in ins)):
            early.append(ins)
    done()
for b in bad:
    print("check-pdl:", b, file=sys.stderr)
if bad:
    sys.exit(1)
print(f"check-pdl: {kernels} kernels wait for their predecessor before touching global memory")
PY
