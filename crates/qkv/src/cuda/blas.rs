//! Matrix products on cuBLASLt: TF32 for f32 runs, bf16 operands with f32 accumulation and f32
//! output for mixed precision (as `torch.autocast`).
//!
//! On cuBLASLt's C API (`cudarc::cublaslt::result`) rather than cudarc's `Matmul` trait: that
//! trait gives A, B and C one element type (mixed precision needs bf16 A and B with an f32 C)
//! and builds descriptors and asks the heuristic on every call; here one plan per product shape
//! is made once and reused by every step (a training step repeats the same few shapes).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::view::{DevMut, DevRef};
use super::CudaError;

/// The operands' element type and the arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// f32 operands, TF32 tensor-core products with f32 accumulation.
    Tf32,
    /// bf16 operands, f32 accumulation and output.
    Bf16,
}

/// A column-major product as cuBLASLt sees it: D (m, n) = op(A)·op(B) (+ C).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub mode: Mode,
    pub accumulate: bool,
}

/// Descriptors, layouts and the chosen algorithm of one product shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by `Blas::plan` and is destroyed once, here.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.c);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Shape, Plan>>,
    stream: Arc<CudaStream>,
}

// SAFETY: the cuBLASLt handle and the plans' descriptors are plain handles that cuBLASLt allows
// to be used from any thread; the plan map is behind a mutex, and every product is queued on
// the one stream, which orders them.
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

/// cuBLASLt's advice: 32 MiB of workspace on Hopper, 4 MiB before.
fn workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>, major: i32) -> Result<Self, CudaError> {
        let handle = result::create_handle()?;
        // SAFETY: cuBLASLt only uses the workspace as scratch; its contents never matter.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes(major)) }?;
        Ok(Self {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
            stream,
        })
    }

    fn plan(&self, s: &Shape) -> Result<Plan, CudaError> {
        let (ab_type, compute) = match s.mode {
            Mode::Tf32 => (
                sys::cudaDataType_t::CUDA_R_32F,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            Mode::Bf16 => (
                sys::cudaDataType_t::CUDA_R_16BF,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
        };
        let (ar, ac) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (br, bc) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        let desc = result::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F)?;
        let a = result::create_matrix_layout(ab_type, ar, ac, s.lda)?;
        let b = result::create_matrix_layout(ab_type, br, bc, s.ldb)?;
        let c = result::create_matrix_layout(sys::cudaDataType_t::CUDA_R_32F, s.m, s.n, s.ldc)?;
        let mut plan = Plan {
            desc,
            a,
            b,
            c,
            // SAFETY: a plain C struct of integers, filled in below before any use.
            algo: unsafe { std::mem::zeroed() },
        };
        let ops = [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                s.trans_a,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                s.trans_b,
            ),
        ];
        for (attr, t) in ops {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (an int-sized enum).
            let op: i32 = t as i32;
            // SAFETY: `desc` is live; the attribute takes a cublasOperation_t by pointer.
            unsafe {
                result::set_matmul_desc_attribute(
                    desc,
                    attr,
                    (&op) as *const _ as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }?;
        }
        let pref = result::create_matmul_pref()?;
        let size = self.workspace.len();
        // SAFETY: `pref` is live; the attribute takes a usize by pointer. Every handle passed
        // to the heuristic is live; `pref` is destroyed right after it.
        let heuristic = unsafe {
            let set = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size) as *const _ as *const c_void,
                std::mem::size_of::<usize>(),
            );
            let h = set.and_then(|()| {
                result::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref)
            });
            let _ = result::destroy_matmul_pref(pref);
            h
        }?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    /// D = op(A)·op(B) (+ D when `s.accumulate`), column-major as `s` describes; A and B of
    /// `s.mode`'s element type (f32 or bf16 bits), D f32.
    ///
    /// # Safety
    /// `a`, `b` and `d` must hold the matrices `s` describes (rows, columns, leading
    /// dimensions), of the element type of `s.mode`.
    pub unsafe fn matmul<T>(
        &self,
        s: &Shape,
        a: DevRef<T>,
        b: DevRef<T>,
        d: DevMut<f32>,
    ) -> Result<(), CudaError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if !plans.contains_key(s) {
            let p = self.plan(s)?;
            plans.insert(*s, p);
        }
        let p = &plans[s];
        let (alpha, beta) = (1.0f32, if s.accumulate { 1.0f32 } else { 0.0 });
        let stream = &self.stream;
        let (ap, bp, dp) = (a.addr(), b.addr(), d.shared().addr());
        let (wp, _rw) = self.workspace.device_ptr(stream);
        // SAFETY: the plan's handles are live (owned by the map, locked); the caller promises
        // the buffers match the plan's layouts; C and D are the same buffer, as cuBLASLt allows
        // with one layout.
        unsafe {
            result::matmul(
                self.handle,
                p.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                ap as *const c_void,
                p.a,
                bp as *const c_void,
                p.b,
                dp as *const c_void,
                p.c,
                dp as *mut c_void,
                p.c,
                &p.algo,
                wp as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as sys::cudaStream_t,
            )
        }?;
        Ok(())
    }
}
