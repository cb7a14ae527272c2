//! GPU check and benchmark of the two attention ops of the CUDA backend (`cuda/attention.cu`).
//!
//! Part of the kernel test flow: `op_check` covers every op at a few shapes; this example goes
//! deep on attention. It runs `prefill_attention` and `decode_attention` on many shapes (block
//! boundaries, odd lengths, prefix hits, chunked prefill, GQA groups 1..8, head_dim 64 and 128,
//! block sizes 16..256, batches 1..512, contexts 1..8192, graph-style `max_context_len` far above
//! the real contexts) with fresh random inputs and outputs poisoned with NaN, and compares each
//! against the CPU backend and, where cheap enough, an f64 reference computed here. Then it
//! times decode and prefill at the target shapes next to a device-to-device copy, and prints a
//! table. Exits non-zero when a check fails.
//!
//! ```text
//! cargo build --release -p nanovllm-kernels --examples
//! target/release/examples/attn_check            # checks, then timings
//! target/release/examples/attn_check --no-bench # checks only
//! target/release/examples/attn_check --bench-only # timings only
//! target/release/examples/attn_check --cpu-only # the harness alone, CPU backend vs f64
//! # also time other builds of the prefill kernel, e.g. from
//! # nvcc -ptx -arch=sm_90 -O3 -std=c++17 -DPF_BM=128 -DPF_BN=32 cuda/attention.cu -o a.ptx
//! target/release/examples/attn_check --prefill-variants 128:32:a.ptx 64:64:b.ptx
//! ```

#[cfg(feature = "cuda")]
mod check;

#[cfg(feature = "cuda")]
fn main() -> std::process::ExitCode {
    check::main()
}

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("attn_check runs the CUDA backend: build it with the `cuda` feature (the default)");
}
