//! The CUDA backend (issue 18): kernels in CUDA C, compiled at run time by NVRTC for the
//! device's architecture, launched through the driver API.
//!
//! Everything NVIDIA is loaded at run time (`cudarc` with `dynamic-loading`): qkv builds and
//! runs on machines without CUDA, and asking for the GPU there is [`CudaError::Unavailable`],
//! naming the library that was not found, never a panic.
//!
//! Each kernel source under `cuda/kernels/` has a CPU twin in [`crate::kernels`] with the same
//! arguments and the same arithmetic in the same order where the GPU allows it; `tests/cuda.rs`
//! holds every kernel to its twin on a GPU, and `tests/cuda_compile.rs` compiles every source
//! with NVRTC on machines without one (CI).

mod blas;
mod nvrtc;
pub mod ops;
pub mod view;

pub use blas::Mode;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};

pub use nvrtc::{compile, compile_fresh, nvrtc_version};

/// One kernel source file and the `extern "C"` functions it defines.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub name: &'static str,
    pub text: &'static str,
    pub functions: &'static [&'static str],
}

/// Prepended to every source: the dropout hash, warp and block reductions, activations.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// Every kernel source qkv launches.
pub const SOURCES: &[Source] = &[
    Source {
        name: "convert",
        text: include_str!("kernels/convert.cu"),
        functions: &["to_bf16"],
    },
    Source {
        name: "embedding",
        text: include_str!("kernels/embedding.cu"),
        functions: &["embedding_forward", "embedding_backward"],
    },
    Source {
        name: "dropout",
        text: include_str!("kernels/dropout.cu"),
        functions: &["residual_add", "dropout_apply"],
    },
    Source {
        name: "layernorm",
        text: include_str!("kernels/layernorm.cu"),
        functions: &[
            "layernorm_forward",
            "residual_layernorm_forward",
            "layernorm_backward_input",
            "layernorm_param_grads",
        ],
    },
    Source {
        name: "activation",
        text: include_str!("kernels/activation.cu"),
        functions: &[
            "bias_act_forward",
            "bias_act_backward",
            "bias_act_forward_bf16",
            "bias_act_backward_bf16",
        ],
    },
    Source {
        name: "loss",
        text: include_str!("kernels/loss.cu"),
        functions: &["cross_entropy"],
    },
    Source {
        name: "flash",
        text: include_str!("kernels/flash.cu"),
        functions: &[
            "flash_forward_d32",
            "flash_forward_d64",
            "flash_forward_d128",
            "flash_delta",
            "flash_backward_dkdv_d32",
            "flash_backward_dkdv_d64",
            "flash_backward_dkdv_d128",
            "flash_backward_dq_d32",
            "flash_backward_dq_d64",
            "flash_backward_dq_d128",
        ],
    },
    Source {
        name: "flash_tc",
        text: include_str!("kernels/flash_tc.cu"),
        functions: &[
            "flash_forward_tc_d32",
            "flash_forward_tc_d64",
            "flash_forward_tc_d128",
            "flash_backward_tc_d32",
            "flash_backward_tc_d64",
            "flash_dq_scatter",
        ],
    },
    Source {
        name: "pool",
        text: include_str!("kernels/pool.cu"),
        functions: &["pool_forward", "pool_backward"],
    },
    Source {
        name: "decode",
        text: include_str!("kernels/decode.cu"),
        functions: &["attention_one_query", "kv_append", "copy_within"],
    },
    Source {
        name: "optim",
        text: include_str!("kernels/optim.cu"),
        functions: &["adamw_step", "sum_squares", "scale"],
    },
];

/// What went wrong on the way to, or on, the GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No driver, no NVRTC, or no device: says which and how to provide it.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),
    /// A kernel source did not compile; `log` is NVRTC's, with lines of `<name>.cu`.
    #[error("NVRTC could not compile {name}.cu for {arch} ({status}):\n{log}")]
    Compile {
        name: String,
        arch: String,
        status: String,
        log: String,
    },
    #[error("CUDA driver: {0}{hint}", hint = out_of_memory_hint(.0))]
    Driver(#[from] DriverError),
    #[error("cuBLASLt: {0:?}")]
    Blas(#[from] cudarc::cublaslt::result::CublasError),
    /// What the CUDA backend does not run (yet), named, with what to use instead.
    #[error("{0}")]
    Unsupported(String),
    /// A kernel called with buffers that do not hold its shape.
    #[error("{kernel}: {msg}")]
    Shape { kernel: &'static str, msg: String },
}

/// What to change when the GPU's memory ran out (the commonest failure of a GPU run).
fn out_of_memory_hint(e: &DriverError) -> &'static str {
    match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            " (the GPU's memory is full: fewer tokens per batch need less, `train.max_tokens` \
             or `--max-tokens`; bf16 products need less too)"
        }
        _ => "",
    }
}

/// Whether the CUDA driver library (`libcuda.so`) can be loaded here.
pub fn driver_available() -> bool {
    // SAFETY: only tries to open the library by its candidate names; nothing is called in it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (`libnvrtc.so.13`) can be loaded here.
pub fn nvrtc_available() -> bool {
    // SAFETY: as in `driver_available`.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Where to get NVRTC when it is missing: the PyPI wheel CI and the scripts use.
pub const NVRTC_HINT: &str = "libnvrtc.so.13 was not found on LD_LIBRARY_PATH (pip install \
    'nvidia-cuda-nvrtc==13.0.*' and add its nvidia/cu13/lib directory)";

/// Whether cuBLASLt (`libcublasLt.so.13`) can be loaded here.
pub fn cublaslt_available() -> bool {
    // SAFETY: as in `driver_available`.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// One GPU: its context, the stream every kernel runs on, cuBLASLt for the products, and the
/// kernels loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: blas::Blas,
    /// Each source is compiled and loaded at the first use of one of its kernels: a process
    /// that runs products only never waits for flash attention's compile.
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    name: String,
    arch: (i32, i32),
}

impl Gpu {
    /// Opens device `ordinal`. Kernels are compiled for its architecture when first used (see
    /// [`compile`] for the caches).
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !driver_available() {
            return Err(CudaError::Unavailable(
                "the NVIDIA driver library (libcuda.so) was not found: this machine has no \
                 usable NVIDIA GPU driver"
                    .into(),
            ));
        }
        if !nvrtc_available() {
            return Err(CudaError::Unavailable(NVRTC_HINT.into()));
        }
        if !cublaslt_available() {
            return Err(CudaError::Unavailable(
                "libcublasLt.so.13 was not found on LD_LIBRARY_PATH (pip install \
                 'nvidia-cublas==13.0.*' and add its nvidia/cu13/lib directory)"
                    .into(),
            ));
        }
        let count = CudaContext::device_count()?;
        if ordinal as i32 >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} asked for, {count} found"
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        let arch = ctx.compute_capability()?;
        let name = ctx.name()?;
        let stream = ctx.default_stream();
        let blas = blas::Blas::new(stream.clone(), arch.0)?;
        Ok(Self {
            ctx,
            stream,
            blas,
            functions: Mutex::new(HashMap::new()),
            name,
            arch,
        })
    }

    /// The device's name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.arch.0, self.arch.1)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn blas(&self) -> &blas::Blas {
        &self.blas
    }

    /// Kernel `name`, compiling and loading its source at the first use of any of its kernels.
    pub(crate) fn function(&self, name: &'static str) -> Result<CudaFunction, CudaError> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let src = SOURCES
            .iter()
            .find(|s| s.functions.contains(&name))
            .ok_or_else(|| CudaError::Shape {
                kernel: name,
                msg: "no source defines this kernel".into(),
            })?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(compile(src, self.arch)?))?;
        for &f in src.functions {
            functions.insert(f, module.load_function(f)?);
        }
        Ok(functions[name].clone())
    }

    /// Compiles and loads every source now (a test of them all, or a warm-up before timing).
    pub fn load_all(&self) -> Result<(), CudaError> {
        for src in SOURCES {
            self.function(src.functions[0])?;
        }
        Ok(())
    }

    /// Waits for every kernel queued so far.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    #[test]
    fn out_of_memory_says_what_to_lower() {
        let oom = DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert!(out_of_memory_hint(&oom).contains("train.max_tokens"));
        let other = DriverError(CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(out_of_memory_hint(&other), "");
    }
}
