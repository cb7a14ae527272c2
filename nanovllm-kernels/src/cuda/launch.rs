//! Kernel launches with programmatic dependent launch (PDL, Hopper and newer).
//!
//! Between two dependent kernels of a stream (or of a captured CUDA graph) the GPU normally
//! drains the first completely before it starts scheduling the second: a gap of a few
//! microseconds per kernel, which a decode step of ~300 small kernels pays ~300 times. With the
//! launch attribute `PROGRAMMATIC_STREAM_SERIALIZATION`, the second kernel may be launched as
//! soon as every block of the first has executed `griddepcontrol.launch_dependents`; its blocks
//! then run their prologue and block in `griddepcontrol.wait` until the first grid has
//! completed and its writes are visible. Every kernel of `cuda/*.cu` follows that contract
//! (`pdl_launch_dependents()` + `pdl_wait()` in common.cuh, called before any read or write of
//! memory another kernel touches; the skinny GEMM issues its weight loads before the wait), so
//! any of them may be launched this way. A kernel that waits orders itself after its
//! predecessor's completion, which in turn came after that one's predecessor: the chain stays
//! ordered as a plain stream would be.
//!
//! [`Launch`] is a drop-in for cudarc's `LaunchArgs` (same `.arg(..)` calls through
//! [`PushKernelArg`]) that launches through `cuLaunchKernelEx`, with the attribute when
//! [`pdl_enabled`] (`NANOVLLM_PDL=0` turns it off) and without otherwise. It copies each
//! argument into a fixed slot, so a launch allocates nothing.

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg,
};

// Each argument is kept in a 64-bit slot and the driver reads as many bytes as the kernel's
// parameter has from the slot's address: the low bytes, on a little-endian host.
#[cfg(target_endian = "big")]
compile_error!("kernel arguments are passed in little-endian 64-bit slots");

/// Whether kernels are launched with programmatic dependent launch: on unless the environment
/// sets `NANOVLLM_PDL=0` (read once per process).
pub fn pdl_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| nanovllm_utils::env_switch("NANOVLLM_PDL", true))
}

/// Most arguments a kernel of this crate takes (the decode attention kernels take 18).
const MAX_ARGS: usize = 32;

/// A kernel launch being assembled: `Launch::new(stream, func).arg(..)...launch(cfg)`. Every
/// argument (a scalar, or a buffer's device address) is copied into a slot here, so a launch
/// allocates nothing.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    slots: [u64; MAX_ARGS],
    /// For arguments passed by value as a struct ([`Launch::arg_struct`]): where their bytes
    /// are (null for the slot arguments).
    structs: [*const c_void; MAX_ARGS],
    /// Arguments pushed; more than `MAX_ARGS` makes `launch` fail.
    len: usize,
    /// CTAs per thread-block cluster along x (1: no cluster).
    cluster_x: u32,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction) -> Self {
        Self {
            stream,
            func,
            slots: [0; MAX_ARGS],
            structs: [std::ptr::null(); MAX_ARGS],
            len: 0,
            cluster_x: 1,
        }
    }

    /// Launches the grid as thread-block clusters of `x` consecutive CTAs along x (the grid's
    /// x a multiple of it).
    pub(crate) fn cluster(&mut self, x: u32) -> &mut Self {
        self.cluster_x = x.max(1);
        self
    }

    /// Passes `value`'s bytes as the next argument: a struct the kernel takes by value (a
    /// `CUtensorMap`), borrowed until the launch.
    pub(crate) fn arg_struct<T>(&mut self, value: &'a T) -> &mut Self {
        if let Some(p) = self.structs.get_mut(self.len) {
            *p = value as *const T as *const c_void;
        }
        self.push(0)
    }

    fn push(&mut self, slot: u64) -> &mut Self {
        if let Some(s) = self.slots.get_mut(self.len) {
            *s = slot;
        }
        self.len += 1;
        self
    }

    /// Queues the kernel on the stream (captured when the stream is capturing).
    ///
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments must match the kernel's parameters in
    /// number, order and type, and the kernel must stay within the buffers it is given.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        if self.len > MAX_ARGS {
            return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        }
        self.stream.context().bind_to_thread()?;
        let mut params = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for ((p, s), st) in params
            .iter_mut()
            .zip(self.slots.iter_mut())
            .zip(self.structs.iter())
        {
            *p = if st.is_null() {
                s as *mut u64 as *mut c_void
            } else {
                st.cast_mut()
            };
        }
        let attr = |id| sys::CUlaunchAttribute {
            id,
            pad: [0; 4],
            // SAFETY: an all-zero union is a valid value of each of its plain-data variants.
            value: unsafe { std::mem::zeroed() },
        };
        let mut attrs = [
            attr(sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION),
            attr(sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION),
        ];
        let mut count = 0;
        if pdl_enabled() {
            attrs[count].value.programmaticStreamSerializationAllowed = 1;
            count += 1;
        }
        if self.cluster_x > 1 {
            attrs[count] = attr(sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION);
            attrs[count].value.clusterDim.x = self.cluster_x;
            attrs[count].value.clusterDim.y = 1;
            attrs[count].value.clusterDim.z = 1;
            count += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: count as u32,
        };
        // SAFETY: `params` points at this launch's slots and borrowed structs, which are not
        // touched until the call returns (the driver copies the arguments during it); the caller
        // vouches for their match with the kernel; `config` and `attrs` are valid for the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// A scalar kernel argument and its 64-bit slot: the value's bytes first (little-endian), the
/// rest zero.
trait Scalar: Copy {
    fn slot(self) -> u64;
}

impl Scalar for i32 {
    fn slot(self) -> u64 {
        u64::from(self as u32)
    }
}

impl Scalar for u32 {
    fn slot(self) -> u64 {
        u64::from(self)
    }
}

impl Scalar for i64 {
    fn slot(self) -> u64 {
        self as u64
    }
}

impl Scalar for u64 {
    fn slot(self) -> u64 {
        self
    }
}

impl Scalar for f32 {
    fn slot(self) -> u64 {
        u64::from(self.to_bits())
    }
}

// SAFETY: the value's bytes are copied into the slot, where the driver reads them.
unsafe impl<T: Scalar> PushKernelArg<&T> for Launch<'_> {
    fn arg(&mut self, arg: &T) -> &mut Self {
        self.push(arg.slot())
    }
}

// SAFETY (all four impls below): the device address of a buffer borrowed for the builder's
// lifetime, so it outlives the launch; event tracking is off in this crate, so the returned
// guards record nothing.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaSlice<T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr(self.stream);
        self.push(ptr)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaSlice<T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr_mut(self.stream);
        self.push(ptr)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b CudaView<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaView<'c, T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr(self.stream);
        self.push(ptr)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b mut CudaViewMut<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaViewMut<'c, T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr_mut(self.stream);
        self.push(ptr)
    }
}

#[cfg(test)]
mod tests {
    use super::Scalar;

    /// The driver reads a parameter's size in bytes from the start of its slot: those bytes
    /// must be the value's own.
    #[test]
    fn scalar_slots_start_with_the_value_bytes() {
        fn head<const N: usize>(slot: u64) -> [u8; N] {
            slot.to_le_bytes()[..N].try_into().unwrap()
        }
        assert_eq!(head::<4>((-3i32).slot()), (-3i32).to_ne_bytes());
        assert_eq!(
            head::<4>(0xdead_beefu32.slot()),
            0xdead_beefu32.to_ne_bytes()
        );
        assert_eq!(head::<4>((-1.5f32).slot()), (-1.5f32).to_ne_bytes());
        assert_eq!(head::<8>((-7i64).slot()), (-7i64).to_ne_bytes());
        assert_eq!(head::<8>(u64::MAX.slot()), u64::MAX.to_ne_bytes());
        // The rest of a 4-byte value's slot is zero.
        assert_eq!((-1i32).slot() >> 32, 0);
    }
}
