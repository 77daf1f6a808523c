//! Matrix products through the `gemm` crate (it reaches the cores' f32 peak and takes
//! arbitrary row/column strides, so transposes and per-head views need no copies).

use std::cell::Cell;
use std::marker::PhantomData;

use super::bf16::Operand;
use super::Acc;
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

/// How a product operand is stored, relative to the shape the product reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Stored in the shape the product reads, row-major: `a` as (m, k), `b` as (k, n).
    RowMajor,
    /// Stored as its transpose, row-major: `a` as (k, m), `b` as (n, k) — a weight (O, I) read
    /// as Wᵀ, or dy read as dyᵀ in a weight gradient.
    Transposed,
}

impl Layout {
    /// `Transposed` when `transposed`: for callers that carry the choice as a flag.
    pub fn transposed_if(transposed: bool) -> Self {
        if transposed {
            Layout::Transposed
        } else {
            Layout::RowMajor
        }
    }
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
    a_layout: Layout,
    b_layout: Layout,
    acc: Acc,
) {
    match (a, b) {
        (Operand::F32(a), Operand::F32(b)) => matmul(out, a, b, m, k, n, a_layout, b_layout, acc),
        _ => super::bf16::matmul_bf16_operands(out, a, b, m, k, n, a_layout, b_layout, acc),
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

/// Elements from the first to the last of a (rows, cols) view with strides `rs`, `cs`.
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A read-only strided view of a (rows, cols) matrix borrowed for `'a`: element (i, j) is at
/// `ptr + i·rs + j·cs`. The constructors check that every element lies inside the borrowed
/// slice, and the methods keep it so, so reading through a view needs no `unsafe`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _data: PhantomData<&'a [f32]>,
}

// SAFETY: a `MatRef<'a>` only reads the elements of the `&'a [f32]` it was made from, and that
// slice is `Send` and `Sync`.
unsafe impl Send for MatRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for MatRef<'_> {}

impl<'a> MatRef<'a> {
    /// `s` as a row-major (rows, cols) matrix.
    pub fn new(s: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(s, rows, cols, cols)
    }

    /// Rows of `cols` contiguous elements, `rs` apart, from the start of `s`.
    pub fn strided(s: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            span(rows, cols, rs, 1) <= s.len(),
            "matrix view exceeds its slice"
        );
        Self {
            ptr: s.as_ptr(),
            rows,
            cols,
            rs,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// A product's (rows, cols) operand stored in `s` with `layout`.
    pub fn operand(s: &'a [f32], rows: usize, cols: usize, layout: Layout) -> Self {
        match layout {
            Layout::RowMajor => Self::new(s, rows, cols),
            Layout::Transposed => Self::new(s, cols, rows).t(),
        }
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `[r0, r0 + n)`.
    pub fn rows(self, r0: usize, n: usize) -> Self {
        assert!(r0 + n <= self.rows, "rows outside the view");
        Self {
            ptr: self.ptr.wrapping_add(r0 * self.rs),
            rows: n,
            ..self
        }
    }

    /// Row `i` as a slice (views with contiguous rows only).
    pub fn row(self, i: usize) -> &'a [f32] {
        assert!(
            self.cs == 1 && i < self.rows,
            "not a row of a row-major view"
        );
        // SAFETY: row i < rows of a view whose elements all lie in a slice borrowed for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * self.rs), self.cols) }
    }

    pub fn nrows(self) -> usize {
        self.rows
    }

    pub fn ncols(self) -> usize {
        self.cols
    }

    /// Distance between rows (elements).
    pub fn rs(self) -> usize {
        self.rs
    }

    /// Distance between columns (elements).
    pub fn cs(self) -> usize {
        self.cs
    }

    pub fn ptr(self) -> *const f32 {
        self.ptr
    }
}

/// A writable strided view, addressed as [`MatRef`]: the unique borrow of its elements for
/// `'a`, as a `&'a mut [f32]` is, so writing through it needs no `unsafe` either. Not `Copy`:
/// [`MatMut::rows`] lends views of its rows.
pub(crate) struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
    _data: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `MatMut<'a>` is the unique borrow of its elements (a `&'a mut [f32]` with strides,
// which is `Send`): moving it to another thread moves that borrow.
unsafe impl Send for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// `s` as a row-major (rows, cols) matrix.
    pub fn new(s: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(s, rows, cols, cols)
    }

    /// Rows of `cols` contiguous elements, `rs` apart, from the start of `s`.
    pub fn strided(s: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            span(rows, cols, rs, 1) <= s.len(),
            "matrix view exceeds its slice"
        );
        // SAFETY: in bounds (checked), and `s` is borrowed uniquely for 'a.
        unsafe { Self::from_raw(s.as_mut_ptr(), rows, cols, rs) }
    }

    /// Rows of `cols` contiguous elements, `rs` apart, from `ptr`.
    ///
    /// # Safety
    /// The elements must be valid for reads and writes for `'a`, and nothing else may access
    /// them while the view (or one lent from it) lives.
    pub unsafe fn from_raw(ptr: *mut f32, rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            ptr,
            rows,
            cols,
            rs,
            cs: 1,
            _data: PhantomData,
        }
    }

    /// Rows `[r0, r0 + n)`, lent.
    pub fn rows(&mut self, r0: usize, n: usize) -> MatMut<'_> {
        assert!(r0 + n <= self.rows, "rows outside the view");
        MatMut {
            ptr: self.ptr.wrapping_add(r0 * self.rs),
            rows: n,
            _data: PhantomData,
            ..*self
        }
    }

    /// Row `i` as a slice (views with contiguous rows only).
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(
            self.cs == 1 && i < self.rows,
            "not a row of a row-major view"
        );
        // SAFETY: row i < rows lies in the elements this view borrows uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols) }
    }

    /// Set every element to `value`.
    pub fn fill(&mut self, value: f32) {
        if self.cs == 1 {
            (0..self.rows).for_each(|i| self.row_mut(i).fill(value));
            return;
        }
        for i in 0..self.rows {
            for j in 0..self.cols {
                // SAFETY: (i, j) is inside the view, whose elements it borrows uniquely.
                unsafe { *self.ptr.add(i * self.rs + j * self.cs) = value };
            }
        }
    }

    /// Multiply every element by `factor`.
    pub fn scale(&mut self, factor: f32) {
        if self.cs == 1 {
            (0..self.rows).for_each(|i| scale_slice(self.row_mut(i), factor));
            return;
        }
        for i in 0..self.rows {
            for j in 0..self.cols {
                // SAFETY: as in `fill`.
                unsafe { *self.ptr.add(i * self.rs + j * self.cs) *= factor };
            }
        }
    }

    pub fn nrows(&self) -> usize {
        self.rows
    }

    pub fn ncols(&self) -> usize {
        self.cols
    }

    /// Distance between rows (elements).
    pub fn rs(&self) -> usize {
        self.rs
    }

    /// Distance between columns (elements).
    pub fn cs(&self) -> usize {
        self.cs
    }

    /// The first element, for kernels that write through raw pointers.
    pub fn ptr(&mut self) -> *mut f32 {
        self.ptr
    }
}

/// `dst (m, n) = [dst +] scale · a (m, k) · b (k, n)` on strided views, through the `gemm`
/// crate, parallel as `par` says.
pub(crate) fn gemm_strided(
    dst: &mut MatMut,
    a: MatRef,
    b: MatRef,
    scale: f32,
    acc: Acc,
    par: gemm::Parallelism,
) {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    assert!(
        a.rows == m && b.rows == k && b.cols == n,
        "product shapes disagree"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Acc::Set {
            dst.fill(0.0);
        }
        return;
    }
    let s = |x: usize| x as isize;
    // SAFETY: every element of the three views lies in memory they borrow (checked when they
    // were made), for the shapes checked above; `dst` borrows its elements uniquely, so it
    // overlaps neither operand, and no other thread touches it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            s(dst.cs),
            s(dst.rs),
            acc.adds(),
            a.ptr,
            s(a.cs),
            s(a.rs),
            b.ptr,
            s(b.cs),
            s(b.rs),
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    };
}

/// `out (m, n) = [out +] op(a) · op(b)` for contiguous row-major operands, multi-threaded.
/// `op(a)` is (m, k): `a` is stored (m, k), or (k, m) when `a_layout` is
/// [`Layout::Transposed`]. Likewise `b` is stored (k, n), or (n, k).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    a_layout: Layout,
    b_layout: Layout,
    acc: Acc,
) {
    if bf16_active() {
        return super::bf16::matmul_bf16(out, a, b, m, k, n, a_layout, b_layout, acc);
    }
    let _p = crate::profile::scope(match (a_layout, b_layout) {
        (Layout::RowMajor, Layout::Transposed) => "matmul x·Wᵀ",
        (Layout::Transposed, Layout::RowMajor) => "matmul dyᵀ·x",
        _ => "matmul dy·W",
    });
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul operand too small"
    );
    if (a_layout, b_layout) == (Layout::RowMajor, Layout::Transposed)
        && super::packed::try_matmul_packed(out, a, b, m, k, n, acc)
    {
        return;
    }
    let av = MatRef::operand(a, m, k, a_layout);
    let mut dst = MatMut::new(out, m, n);
    if b_layout == Layout::Transposed && m >= 4 * k.min(n) {
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
            let bv = MatRef::new(&bt[..k * n], k, n);
            gemm_strided(&mut dst, av, bv, 1.0, acc, gemm_par());
            true
        });
        if done {
            return;
        }
    }
    let bv = MatRef::operand(b, k, n, b_layout);
    gemm_strided(&mut dst, av, bv, 1.0, acc, gemm_par())
}

thread_local! {
    /// [`matmul`]'s row-major copy of a transposed right operand; grows to the largest seen.
    static B_ROW_MAJOR: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst (cols, rows) ← src (rows, cols)ᵀ`, both contiguous, in row bands across the pool.
fn transpose_par(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    use rayon::prelude::*;
    let _p = crate::profile::scope("matmul operand transpose");
    assert!(dst.len() >= rows * cols);
    let src = MatRef::new(src, rows, cols);
    // Bands of source rows, a multiple of 8 so the 8 × 8 blocks stay whole.
    let band = (rows.div_ceil(4 * rayon::current_num_threads()).div_ceil(8) * 8).max(64);
    let out = crate::parallel::SendPtr(dst.as_mut_ptr());
    (0..rows.div_ceil(band)).into_par_iter().for_each(|i| {
        let r0 = i * band;
        let r = band.min(rows - r0);
        // SAFETY: band i alone writes destination columns [r0, r0 + r) of the (cols, rows)
        // destination, which lies in `dst` (asserted above) and is borrowed for this call.
        let mut dst_band = unsafe { MatMut::from_raw(out.get().add(r0), cols, r, rows) };
        super::tile::transpose(&mut dst_band, src.rows(r0, r));
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
    a_layout: Layout,
    b_layout: Layout,
    acc: Acc,
) {
    let (ta, tb) = (
        a_layout == Layout::Transposed,
        b_layout == Layout::Transposed,
    );
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let x = if ta { a[p * m + i] } else { a[i * k + p] };
                let y = if tb { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * y as f64;
            }
            let o = &mut out[i * n + j];
            *o = if acc.adds() { *o + s as f32 } else { s as f32 };
        }
    }
}

crate::simd::multiversion! {
    /// `x ← x · factor`, vectorized (flash attention rescales output rows with it).
    fn scale_slice(x: &mut [f32], factor: f32) {
        x.iter_mut().for_each(|v| *v *= factor);
    }
}
