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
//! [`PushKernelArg`]) that launches through `cuLaunchKernelEx` with the attribute when
//! [`pdl_enabled`], and through `cuLaunchKernel` otherwise. `NANOVLLM_PDL=0` turns it off.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, PushKernelArg,
};

/// Whether kernels are launched with programmatic dependent launch: on unless the environment
/// sets `NANOVLLM_PDL=0` (read once per process).
pub fn pdl_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("NANOVLLM_PDL").map_or(true, |v| v.trim() != "0"))
}

/// One kernel argument: the address of a host value the driver copies at launch, or a device
/// address held here.
enum Arg {
    Host(*const c_void),
    Device(CUdeviceptr),
}

/// A kernel launch being assembled: `Launch::new(stream, func).arg(..)...launch(cfg)`.
/// Arguments borrowed from the caller (`'a`) outlive the launch, as with cudarc's builder.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    args: Vec<Arg>,
    _borrows: PhantomData<&'a ()>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction) -> Self {
        Self {
            stream,
            func,
            args: Vec::with_capacity(24),
            _borrows: PhantomData,
        }
    }

    /// Queues the kernel on the stream (captured when the stream is capturing).
    ///
    /// # Safety
    /// As cudarc's `LaunchArgs::launch`: the arguments must match the kernel's parameters in
    /// number, order and type, and the kernel must stay within the buffers it is given.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut c_void> = self
            .args
            .iter()
            .map(|a| match a {
                Arg::Host(p) => *p as *mut c_void,
                Arg::Device(d) => d as *const CUdeviceptr as *mut c_void,
            })
            .collect();
        let mut attr = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            // SAFETY: an all-zero union is a valid value of each of its plain-data variants.
            value: unsafe { std::mem::zeroed() },
        };
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(pdl_enabled()),
        };
        // SAFETY: `params` points at values that live until this call returns (host values
        // borrowed for 'a, device addresses in `self.args`, which is not modified meanwhile);
        // the caller vouches for their match with the kernel; `config` and `attr` are valid
        // for the call.
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

    fn device(&mut self, ptr: CUdeviceptr) -> &mut Self {
        self.args.push(Arg::Device(ptr));
        self
    }
}

macro_rules! host_args {
    ($($t:ty),*) => {$(
        // SAFETY: the value is borrowed for the builder's lifetime and copied by the driver at
        // launch, exactly as cudarc's own builder does.
        unsafe impl<'a, 'b: 'a> PushKernelArg<&'b $t> for Launch<'a> {
            fn arg(&mut self, arg: &'b $t) -> &mut Self {
                self.args.push(Arg::Host(arg as *const $t as *const c_void));
                self
            }
        }
    )*};
}
host_args!(i32, u32, i64, u64, f32);

// SAFETY (all four impls below): device addresses of buffers borrowed for the builder's
// lifetime; event tracking is off in this crate, so the returned guards record nothing.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaSlice<T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr(self.stream);
        self.device(ptr)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaSlice<T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr_mut(self.stream);
        self.device(ptr)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b CudaView<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaView<'c, T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr(self.stream);
        self.device(ptr)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b mut CudaViewMut<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaViewMut<'c, T>) -> &mut Self {
        let (ptr, _guard) = arg.device_ptr_mut(self.stream);
        self.device(ptr)
    }
}
