// The f32 instructions --use_fast_math gives the norms (norm.cu, rope.cu), spelled out in PTX so
// that a file compiled without fast math (custom_ar.cu, attention.cu) computes the same bits.
// Written without a rounding modifier where that PTX has none, so that ptxas treats them alike:
// it contracts div.approx's multiply by 1/n and the add of eps into one FFMA.FTZ in both (checked
// in the SASS).
#pragma once

__device__ __forceinline__ float add_ftz(float a, float b) {
    float d;
    asm("add.ftz.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
    float d;
    asm("mul.ftz.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ float fma_ftz(float a, float b, float c) {
    float d;
    asm("fma.rn.ftz.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

// rsqrt(ss / hidden + eps) as norm.cu and rope.cu compute it.
__device__ __forceinline__ float inv_rms_ftz(float ss, float hidden, float eps) {
    float d;
    asm("{\n\t.reg .f32 q, m;\n\t"
        "div.approx.ftz.f32 q, %1, %2;\n\t"
        "add.ftz.f32 m, q, %3;\n\t"
        "rsqrt.approx.ftz.f32 %0, m;\n\t}"
        : "=f"(d)
        : "f"(ss), "f"(hidden), "f"(eps));
    return d;
}

