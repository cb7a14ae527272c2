#!/usr/bin/env bash
# Builds the GPU tools here (no GPU needed) and stages them, stripped, in gpu/bin/ (a
# git-ignored folder that travels to the GPU machine): the `nanovllm` command for
# scripts/gpu/e2e.sh, op_check / op_bench / attn_check for scripts/gpu/ops.sh, and ar_bench
# for scripts/gpu/tp.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p nanovllm -p nanovllm-kernels --bins --examples
mkdir -p gpu/bin
cp "$target/release/nanovllm" gpu/bin/
for ex in op_check op_bench attn_check ar_bench; do
    cp "$target/release/examples/$ex" gpu/bin/
done
strip gpu/bin/*
ls -l gpu/bin
