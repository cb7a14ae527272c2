#!/usr/bin/env bash
# Regenerates the kernels shipped in nanovllm-kernels/ from nanovllm-kernels/cuda/*.cu with
# nvcc 13.0: the PTX in ptx/ (ISA 9.0, which driver 580 / CUDA 13.0 loads; newer nvcc emits
# newer PTX) and, assembled from that PTX by the ptxas beside nvcc, the sm_90 machine code in
# cubin/ (loaded on H100 and H200 instead of JIT-compiling the PTX at start-up). Machines
# without nvcc build from the shipped files (see nanovllm-kernels/build.rs); commit the result
# after changing a .cu file. CI (scripts/check-ptx.sh) fails when they are stale.
#
# Usage: scripts/build-ptx.sh [PTX_DIR CUBIN_DIR]
#        (default nanovllm-kernels/ptx and nanovllm-kernels/cubin)
# nvcc: $NVCC if set, else .venv-nvcc (created with pip when missing).
# Flags: -ptx -arch=sm_90 -O3 -std=c++17 plus each file's `// nvcc-flags:` line, then
# ptxas -arch=sm_90 -O3: exactly what build.rs passes. A file's `// nvcc-arch:` line (sm_90a for
# wgmma) replaces sm_90 in both; its machine code still goes to <stem>.sm_90.cubin (H100, H200).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-nanovllm-kernels/ptx}"
cubin_out="${2:-nanovllm-kernels/cubin}"
nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
    nvcc=$(ls .venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
fi
if [ -z "$nvcc" ]; then
    echo "installing nvcc 13.0 into .venv-nvcc (pip)" >&2
    python3 -m venv .venv-nvcc
    .venv-nvcc/bin/pip install -q 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' \
        'nvidia-cuda-runtime==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*'
    nvcc=$(ls .venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
fi
if ! "$nvcc" --version | grep -q 'release 13\.0'; then
    echo "build-ptx: $nvcc is not nvcc 13.0:" >&2
    "$nvcc" --version >&2
    exit 1
fi

ptxas="$(dirname "$nvcc")/ptxas"
mkdir -p "$out" "$cubin_out"
for src in nanovllm-kernels/cuda/*.cu; do
    stem=$(basename "$src" .cu)
    flags=$(sed -n 's#^// nvcc-flags:##p' "$src" | head -n 1)
    # A file may ask for another target (sm_90a: wgmma) on its `// nvcc-arch:` line.
    arch=$(sed -n 's#^// nvcc-arch:[[:space:]]*##p' "$src" | head -n 1)
    arch=${arch:-sm_90}
    # shellcheck disable=SC2086 # the flags are a word list
    "$nvcc" -ptx -arch="$arch" -O3 -std=c++17 $flags -I nanovllm-kernels/cuda "$src" -o "$out/$stem.ptx"
    "$ptxas" -arch="$arch" -O3 "$out/$stem.ptx" -o "$cubin_out/$stem.sm_90.cubin"
    echo "$src -> $out/$stem.ptx, $cubin_out/$stem.sm_90.cubin" >&2
done
if [ "$#" -eq 0 ]; then
    # Drop shipped PTX and machine code whose source is gone.
    for ptx in nanovllm-kernels/ptx/*.ptx; do
        [ -e "nanovllm-kernels/cuda/$(basename "$ptx" .ptx).cu" ] || rm -v "$ptx"
    done
    for cubin in nanovllm-kernels/cubin/*.sm_90.cubin; do
        [ -e "$cubin" ] || continue
        [ -e "nanovllm-kernels/cuda/$(basename "$cubin" .sm_90.cubin).cu" ] || rm -v "$cubin"
    done
fi
