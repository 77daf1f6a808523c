//! Matrix products through the `gemm` crate (it reaches the cores' f32 peak and takes
//! arbitrary row/column strides, so transposes and per-head views need no copies).

use std::cell::Cell;

use super::bf16::Operand;
use crate::parallel::gemm_par;

/// Operand precision of [`matmul`]. Sums are always f32; `Bf16` rounds both operands to bf16
/// and runs the avx512_bf16 kernel ([`super::bf16`]), or plain f32 on CPUs without it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

thread_local! {
    static PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision [`matmul`] uses on this thread.
pub fn matmul_precision() -> Precision {
    PRECISION.with(Cell::get)
}

/// Whether products on this thread run in bf16 (asked for, and the CPU has it): layers then
/// write the activations only products read straight in bf16 (see [`super::bf16::Operand`]).
pub fn bf16_active() -> bool {
    matmul_precision() == Precision::Bf16 && super::bf16::available()
}

/// [`matmul`] with operands that may already be bf16 (only produced when [`bf16_active`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_operands(
    out: &mut [f32],
    a: Operand,
    b: Operand,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    match (a, b) {
        (Operand::F32(a), Operand::F32(b)) => matmul(out, a, b, m, k, n, ta, tb, accumulate),
        _ => super::bf16::matmul_bf16_operands(out, a, b, m, k, n, ta, tb, accumulate),
    }
}

/// Restores the previous precision when dropped; see [`set_matmul_precision`].
#[must_use = "the precision reverts when the guard is dropped"]
pub struct PrecisionGuard(Precision);

impl Drop for PrecisionGuard {
    fn drop(&mut self) {
        PRECISION.with(|p| p.set(self.0));
    }
}

/// Make [`matmul`] on this thread use `p` until the guard drops. Per thread, like
/// `torch.autocast`: a caller's setting never leaks into another model running elsewhere
/// (tests run in parallel threads of one process). The products themselves may still fan out
/// over the rayon pool.
pub fn set_matmul_precision(p: Precision) -> PrecisionGuard {
    PrecisionGuard(PRECISION.with(|c| c.replace(p)))
}

/// A read-only strided matrix: element (i, j) is at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided matrix, same addressing as [`MatRef`].
#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

impl MatRef {
    /// Row-major (rows, cols) slice; with `transpose`, the view of its transpose.
    pub fn rows(s: &[f32], cols: usize, transpose: bool) -> Self {
        let (rs, cs) = if transpose {
            (1, cols as isize)
        } else {
            (cols as isize, 1)
        };
        Self {
            ptr: s.as_ptr(),
            rs,
            cs,
        }
    }
}

impl MatRef {
    /// The view starting `n` rows further down.
    pub fn offset_rows(self, n: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_offset(n as isize * self.rs),
            ..self
        }
    }

    /// The transpose, as a view of the same memory.
    pub fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Row 0 as a slice of `n` elements.
    ///
    /// # Safety
    /// The view must be row-contiguous (`cs == 1`) and address `n` valid elements.
    pub unsafe fn row<'a>(self, n: usize) -> &'a [f32] {
        debug_assert_eq!(self.cs, 1);
        std::slice::from_raw_parts(self.ptr, n)
    }
}

impl MatMut {
    /// The view starting `n` rows further down.
    pub fn offset_rows(self, n: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_offset(n as isize * self.rs),
            ..self
        }
    }

    /// Set the (rows, cols) block to `value`.
    ///
    /// # Safety
    /// The block must be valid memory that no other thread accesses meanwhile.
    pub unsafe fn fill(self, rows: usize, cols: usize, value: f32) {
        if self.cs == 1 {
            for i in 0..rows {
                std::slice::from_raw_parts_mut(self.ptr.offset(i as isize * self.rs), cols)
                    .fill(value);
            }
            return;
        }
        for i in 0..rows {
            for j in 0..cols {
                *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) = value;
            }
        }
    }

    /// Multiply the (rows, cols) block by `factor`.
    ///
    /// # Safety
    /// As [`MatMut::fill`].
    pub unsafe fn fill_scale(self, rows: usize, cols: usize, factor: f32) {
        if self.cs == 1 {
            for i in 0..rows {
                let row = self.ptr.offset(i as isize * self.rs);
                scale_slice(std::slice::from_raw_parts_mut(row, cols), factor);
            }
            return;
        }
        for i in 0..rows {
            for j in 0..cols {
                *self.ptr.offset(i as isize * self.rs + j as isize * self.cs) *= factor;
            }
        }
    }
}

/// `dst (m, n) = [dst +] scale * a (m, k) · b (k, n)` on strided views.
///
/// # Safety
/// The views must address valid memory for the given sizes, and `dst` must not overlap `a`/`b`
/// or be written by another thread at the same time.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    scale: f32,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.ptr.offset(i as isize * dst.rs + j as isize * dst.cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs, 1.0,
        scale, false, false, false, par,
    );
}

/// `out (m, n) = [out +] op(a) · op(b)` for contiguous row-major operands, multi-threaded.
/// `op(a)` is (m, k): `a` is stored (m, k), or (k, m) when `ta`. Likewise `b` is (k, n) or (n, k) when `tb`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    if bf16_active() {
        return super::bf16::matmul_bf16(out, a, b, m, k, n, ta, tb, accumulate);
    }
    let _p = crate::profile::scope(match (ta, tb) {
        (false, true) => "matmul x·Wᵀ",
        (true, false) => "matmul dyᵀ·x",
        _ => "matmul dy·W",
    });
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul operand too small"
    );
    let av = MatRef::rows(a, if ta { m } else { k }, ta);
    let dst = MatMut {
        ptr: out.as_mut_ptr(),
        rs: n as isize,
        cs: 1,
    };
    if tb && m >= 4 * k.min(n) {
        // `gemm` packs a column-major right operand (a weight (n, k) read as its transpose,
        // x·Wᵀ) 5–15% slower than a row-major one; transposing it first costs k·n moves,
        // against m·k·n multiply-adds.
        let done = B_ROW_MAJOR.with(|cell| {
            let Ok(mut bt) = cell.try_borrow_mut() else {
                return false;
            };
            if bt.len() < k * n {
                bt.resize(k * n, 0.0);
            }
            transpose_par(&mut bt[..k * n], b, n, k);
            let bv = MatRef::rows(&bt[..k * n], n, false);
            // SAFETY: sizes checked above; `out` is uniquely borrowed.
            unsafe { gemm_strided(m, n, k, dst, accumulate, av, bv, 1.0, gemm_par()) };
            true
        });
        if done {
            return;
        }
    }
    let bv = MatRef::rows(b, if tb { k } else { n }, tb);
    // SAFETY: sizes checked above; `out` is uniquely borrowed.
    unsafe { gemm_strided(m, n, k, dst, accumulate, av, bv, 1.0, gemm_par()) }
}

thread_local! {
    /// [`matmul`]'s row-major copy of a transposed right operand; grows to the largest seen.
    static B_ROW_MAJOR: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst (cols, rows) ← src (rows, cols)ᵀ`, both contiguous, in row bands across the pool.
fn transpose_par(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    use rayon::prelude::*;
    let _p = crate::profile::scope("matmul operand transpose");
    assert!(dst.len() >= rows * cols && src.len() >= rows * cols);
    // Bands of source rows, a multiple of 8 so the 8 × 8 blocks stay whole.
    let band = (rows.div_ceil(4 * rayon::current_num_threads()).div_ceil(8) * 8).max(64);
    let out = crate::parallel::SendPtr(dst.as_mut_ptr());
    (0..rows.div_ceil(band)).into_par_iter().for_each(|i| {
        let r0 = i * band;
        let r = band.min(rows - r0);
        // SAFETY: band i reads source rows [r0, r0 + r) and writes destination columns
        // [r0, r0 + r), disjoint from every other band; sizes asserted above.
        unsafe {
            super::tile::transpose(
                r,
                cols,
                src.as_ptr().add(r0 * cols),
                cols,
                out.get().add(r0),
                rows,
            )
        };
    });
}

/// Reference triple loop, kept for tests of [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_naive(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * y as f64;
            }
            let o = &mut out[i * n + j];
            *o = if accumulate { *o + s as f32 } else { s as f32 };
        }
    }
}

crate::simd::multiversion! {
    /// `x ← x · factor`, vectorized (flash attention rescales output rows with it).
    fn scale_slice(x: &mut [f32], factor: f32) {
        x.iter_mut().for_each(|v| *v *= factor);
    }
}
