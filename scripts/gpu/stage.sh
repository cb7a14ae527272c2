#!/usr/bin/env bash
# Builds the GPU op tools here (no GPU needed) and stages them, stripped, in gpu/bin/ (a
# git-ignored folder) for scripts/gpu/ops.sh to run on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p nanovllm-kernels --examples
mkdir -p gpu/bin
for ex in op_check op_bench; do
    cp "$target/release/examples/$ex" gpu/bin/
    strip gpu/bin/$ex
done
ls -l gpu/bin/op_check gpu/bin/op_bench
