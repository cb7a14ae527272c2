//! The MLP's activation (nano-vLLM's `layers/activation.py`): SiLU of the gate times the up
//! projection, reading the fused `gate_up` rows that [`crate::linear::MergedColumnParallelLinear`]
//! produces (`[gate_r, up_r]` per row on rank `r`).

use half::bf16;
use nanovllm_kernels::Backend;
use nanovllm_utils::Result;

/// `silu(gate) * up`, row by row.
#[derive(Clone, Copy, Debug, Default)]
pub struct SiluAndMul;

impl SiluAndMul {
    /// `out[i, :inter] = silu(gate_up[i, :inter]) * gate_up[i, inter..2 * inter]` for `n` rows.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        gate_up: &B::Buf<bf16>,
        n: usize,
        inter: usize,
        out: &mut B::Buf<bf16>,
    ) -> Result<()> {
        be.silu_and_mul(gate_up, n, inter, out)
    }
}
