# Sourced by the CI checks of the kernels (check-ptx.sh, check-pdl.sh): sets $nvcc to an nvcc
# 13.0 (the one that makes the shipped PTX): $NVCC, else .venv-nvcc (scripts/build-ptx.sh), else
# one pip installs into "$1/venv" (a throwaway folder of the caller), which is then $nvcc_venv.
# $2 names the caller in messages.
is_13_0() { [ -n "$1" ] && [ -x "$1" ] && "$1" --version 2>/dev/null | grep -q 'release 13\.0'; }
nvcc="${NVCC:-}"
nvcc_venv=""
is_13_0 "$nvcc" || nvcc=$(ls .venv-nvcc/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
if ! is_13_0 "$nvcc"; then
    echo "$2: installing nvcc 13.0 into a throwaway venv" >&2
    python3 -m venv "$1/venv"
    "$1/venv/bin/pip" install -q 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' \
        'nvidia-cuda-runtime==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*'
    nvcc=$(ls "$1"/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc | head -n 1)
    nvcc_venv="$1/venv"
fi
