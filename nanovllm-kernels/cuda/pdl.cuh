// Programmatic dependent launch (PDL, sm_90 and newer), the device side of
// src/cuda/launch.rs. When a kernel is launched with the PDL attribute, the next kernel of the
// stream may start as soon as every block of this one has called pdl_launch_dependents(); it
// must then call pdl_wait() before it reads or writes any memory that an earlier kernel
// touches, and pdl_wait() returns only once the previous grid has completed and its writes are
// visible. Every thread of every kernel calls pdl_wait() (a kernel that did not would no longer
// order itself, nor its successors, after its predecessor). Launched without the attribute,
// both instructions do nothing.
#pragma once

__device__ __forceinline__ void pdl_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// The usual prologue: let the next kernel be scheduled, then wait for the previous one.
__device__ __forceinline__ void pdl_begin() {
    pdl_launch_dependents();
    pdl_wait();
}
