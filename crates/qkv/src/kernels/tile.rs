//! Small matrix products for the fused attention tiles, written by hand for AVX-512 and AVX2.
//!
//! Why not the `gemm` crate here: a flash-attention tile product is small (64 × 256 × 64) and
//! there are N²/(64·256) of them per head. `gemm` packs both operands on every call; profiled
//! at N = 4096 its packing and dispatch took as long as its microkernel. These tiles need no
//! packing: the right operand's rows are already contiguous (K and V head rows, or a
//! transposed K packed once per head), and the left operand is read one broadcast scalar at a
//! time, so any strides work. On CPUs with neither the `gemm` crate does the same product.

use super::matmul::{gemm_strided, MatMut, MatRef};
use super::Acc;

/// `c (m, n) = [c +] alpha · a (m, k) · b (k, n)` on one thread, where `b` and `c` have
/// contiguous rows (`a` may have any strides: it is read one broadcast element at a time).
pub(crate) fn gemm_rows(c: &mut MatMut, a: MatRef, b: MatRef, alpha: f32, acc: Acc) {
    let (m, n, k) = (c.nrows(), c.ncols(), a.ncols());
    assert!(
        a.nrows() == m && b.nrows() == k && b.ncols() == n,
        "product shapes disagree"
    );
    assert!(
        b.cs() == 1 && c.cs() == 1,
        "tile product rows must be contiguous"
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512() {
        let (a_rs, a_cs, b_rs, c_rs) = (a.rs(), a.cs(), b.rs(), c.rs());
        // SAFETY: the CPU has AVX-512F (checked); the kernel reads A[r, p] and B[p, j] and
        // writes C[r, j] for r < m, p < k, j < n only, which lie in the views (their
        // constructors checked it; shapes checked above); `c` borrows its elements uniquely.
        return unsafe {
            avx512::gemm_rows(
                (m, n, k),
                (a.ptr(), a_rs, a_cs),
                (b.ptr(), b_rs),
                (c.ptr(), c_rs),
                alpha,
                acc.adds(),
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        let (a_rs, a_cs, b_rs, c_rs) = (a.rs(), a.cs(), b.rs(), c.rs());
        // SAFETY: the CPU has AVX2 and FMA (checked); otherwise as above.
        return unsafe {
            avx2::gemm_rows(
                (m, n, k),
                (a.ptr(), a_rs, a_cs),
                (b.ptr(), b_rs),
                (c.ptr(), c_rs),
                alpha,
                acc.adds(),
            )
        };
    }
    gemm_strided(c, a, b, alpha, acc, gemm::Parallelism::None);
}

/// `dst ← srcᵀ`: dst (cols, rows) for src (rows, cols), both with contiguous rows.
///
/// The attention tiles transpose K and V (64 × 32 at T = 64, D = 32) for every head; element by
/// element that was a third of the attention's time, so full 8 × 8 blocks go through AVX
/// register shuffles.
pub(crate) fn transpose(dst: &mut MatMut, src: MatRef) {
    let (rows, cols) = (src.nrows(), src.ncols());
    assert!(
        dst.nrows() == cols && dst.ncols() == rows,
        "transpose shapes disagree"
    );
    assert!(
        src.cs() == 1 && dst.cs() == 1,
        "transposed rows must be contiguous"
    );
    let (src_rs, dst_rs) = (src.rs(), dst.rs());
    let (src, dst) = (src.ptr(), dst.ptr());
    let (mut r8, mut c8) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx2() {
        (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
        for p in (0..c8).step_by(8) {
            for j in (0..r8).step_by(8) {
                // SAFETY: the CPU has AVX (checked); the block's rows j..j + 8 < rows and
                // columns p..p + 8 < cols lie in both views (shapes checked above).
                unsafe {
                    avx::block8(
                        src.add(j * src_rs + p),
                        src_rs,
                        dst.add(p * dst_rs + j),
                        dst_rs,
                    )
                };
            }
        }
    }
    // What the blocks did not cover: the rows below r8, then the columns right of c8.
    // SAFETY: j < rows and p < cols, so both elements lie inside the views (shapes checked
    // above); `dst` borrows its elements uniquely.
    unsafe {
        for j in r8..rows {
            for p in 0..cols {
                *dst.add(p * dst_rs + j) = *src.add(j * src_rs + p);
            }
        }
        for j in 0..r8 {
            for p in c8..cols {
                *dst.add(p * dst_rs + j) = *src.add(j * src_rs + p);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// One 8 × 8 block: unpack pairs of rows, shuffle quadruples, then swap 128-bit halves.
    ///
    /// # Safety
    /// The CPU has AVX; 8 rows of 8 floats at `src` (`src_rs` apart) and at `dst` (`dst_rs`
    /// apart) are valid, and those at `dst` are the caller's alone.
    #[inline]
    #[target_feature(enable = "avx")]
    pub unsafe fn block8(src: *const f32, src_rs: usize, dst: *mut f32, dst_rs: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_rs)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // s[q] holds elements q, q + 4 of rows 0–3 (q < 4) or rows 4–7 (q ≥ 4).
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let base = if i < 4 { 0 } else { 4 };
            let (lo, hi) = (t[base + (i % 4) / 2], t[base + 2 + (i % 4) / 2]);
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(lo, hi)
            } else {
                _mm256_shuffle_ps::<0xEE>(lo, hi)
            }
        });
        for q in 0..4 {
            let (a, b) = (s[q], s[q + 4]);
            _mm256_storeu_ps(dst.add(q * dst_rs), _mm256_permute2f128_ps::<0x20>(a, b));
            _mm256_storeu_ps(
                dst.add((q + 4) * dst_rs),
                _mm256_permute2f128_ps::<0x31>(a, b),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows of C per register block: 6 rows × 2 vectors = 12 accumulators of the 16 registers
    /// (two for B's row, one for the broadcast), the block AVX2 BLAS kernels use.
    const MR: usize = 6;
    /// Columns per register block (two 8-float vectors).
    const NR: usize = 16;
    /// Rows of B packed at a time (16 KiB of panel, on the stack).
    const KC: usize = 256;

    /// As the AVX-512 `gemm_rows`, with 8-float vectors.
    ///
    /// Unlike the AVX-512 kernel, B's 16-column strip is copied into a contiguous, zero-padded
    /// panel before the row blocks stream it: B rows here are whole tiles apart (1 KiB for a
    /// transposed K tile of 256 columns), so the strip's k rows fall into a few L1 sets and
    /// evicted each other (read in place, the kernel ran 20% slower than `gemm`).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the elements named in the AVX-512 version are valid, and C's
    /// are the caller's alone.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_rows(
        (m, n, k): (usize, usize, usize),
        (a, a_rs, a_cs): (*const f32, usize, usize),
        (b, b_rs): (*const f32, usize),
        (c, c_rs): (*mut f32, usize),
        alpha: f32,
        accumulate: bool,
    ) {
        let mut panel = [0.0f32; KC * NR];
        let mut p0 = 0;
        loop {
            let kc = (k - p0).min(KC);
            let op = Operands {
                k: kc,
                a_rs,
                a_cs,
                c_rs,
                alpha,
                // Later slices of k add to what the first wrote.
                accumulate: accumulate || p0 > 0,
            };
            let ak = a.add(p0 * a_cs);
            let mut j0 = 0;
            while j0 < n {
                let cols = (n - j0).min(NR);
                for p in 0..kc {
                    let src = b.add((p0 + p) * b_rs + j0);
                    let dst = panel.as_mut_ptr().add(p * NR);
                    if cols == NR {
                        _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
                        _mm256_storeu_ps(dst.add(8), _mm256_loadu_ps(src.add(8)));
                    } else {
                        for j in 0..NR {
                            *dst.add(j) = if j < cols { *src.add(j) } else { 0.0 };
                        }
                    }
                }
                let cj = c.add(j0);
                let mut r0 = 0;
                while r0 < m {
                    let rows = (m - r0).min(MR);
                    let (ar, cr) = (ak.add(r0 * a_rs), cj.add(r0 * c_rs));
                    let pp = panel.as_ptr();
                    match rows {
                        1 => block::<1>(&op, ar, pp, cr, cols),
                        2 => block::<2>(&op, ar, pp, cr, cols),
                        3 => block::<3>(&op, ar, pp, cr, cols),
                        4 => block::<4>(&op, ar, pp, cr, cols),
                        5 => block::<5>(&op, ar, pp, cr, cols),
                        _ => block::<6>(&op, ar, pp, cr, cols),
                    }
                    r0 += rows;
                }
                j0 += cols;
            }
            p0 += kc;
            if p0 >= k {
                break;
            }
        }
    }

    struct Operands {
        k: usize,
        a_rs: usize,
        a_cs: usize,
        c_rs: usize,
        alpha: f32,
        accumulate: bool,
    }

    /// One R × 16 block of C from a packed panel (k rows of 16); only the first `cols` columns
    /// are written.
    ///
    /// # Safety
    /// As [`gemm_rows`], for the block's R rows and `cols` columns; `b` holds k × 16 floats.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize>(
        op: &Operands,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut ap = a;
        let mut bp = b;
        for _ in 0..op.k {
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(r * op.a_rs));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
            ap = ap.add(op.a_cs);
            bp = bp.add(NR);
        }
        let alpha = _mm256_set1_ps(op.alpha);
        for (r, row) in acc.iter().enumerate() {
            let cr = c.add(r * op.c_rs);
            if cols == NR {
                for (v, &x) in row.iter().enumerate() {
                    let p = cr.add(8 * v);
                    let mut y = _mm256_mul_ps(alpha, x);
                    if op.accumulate {
                        y = _mm256_add_ps(y, _mm256_loadu_ps(p));
                    }
                    _mm256_storeu_ps(p, y);
                }
            } else {
                let mut y = [0.0f32; NR];
                _mm256_storeu_ps(y.as_mut_ptr(), _mm256_mul_ps(alpha, row[0]));
                _mm256_storeu_ps(y.as_mut_ptr().add(8), _mm256_mul_ps(alpha, row[1]));
                for (j, &v) in y[..cols].iter().enumerate() {
                    let p = cr.add(j);
                    *p = if op.accumulate { *p + v } else { v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows of C per register block: 6 rows × 4 vectors = 24 accumulators of the 32 registers.
    const MR: usize = 6;
    /// 16-float vectors per register block (64 columns).
    const NV: usize = 4;

    /// `C (m × n) [+]= alpha · A (m × k) · B (k × n)` where `A[r, p] = a[r·a_rs + p·a_cs]`,
    /// `B[p, j] = b[p·b_rs + j]` and `C[r, j] = c[r·c_rs + j]`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; those elements are valid, and C's are the caller's alone.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gemm_rows(
        (m, n, k): (usize, usize, usize),
        (a, a_rs, a_cs): (*const f32, usize, usize),
        (b, b_rs): (*const f32, usize),
        (c, c_rs): (*mut f32, usize),
        alpha: f32,
        accumulate: bool,
    ) {
        let op = Operands {
            k,
            a_rs,
            a_cs,
            b_rs,
            c_rs,
            alpha,
            accumulate,
        };
        let mut j0 = 0;
        while j0 < n {
            let cols = (n - j0).min(16 * NV);
            let nv = cols.div_ceil(16);
            let tail = cols - 16 * (nv - 1);
            let mask: __mmask16 = if tail == 16 {
                0xffff
            } else {
                (1u16 << tail) - 1
            };
            let (bj, cj) = (b.add(j0), c.add(j0));
            let mut r0 = 0;
            while r0 < m {
                let rows = (m - r0).min(MR);
                let (ar, cr) = (a.add(r0 * a_rs), cj.add(r0 * c_rs));
                macro_rules! dispatch {
                    ($($r:literal)*) => {
                        match (rows, nv) {
                            $(
                                ($r, 1) => block::<$r, 1>(&op, ar, bj, cr, mask),
                                ($r, 2) => block::<$r, 2>(&op, ar, bj, cr, mask),
                                ($r, 3) => block::<$r, 3>(&op, ar, bj, cr, mask),
                                ($r, 4) => block::<$r, 4>(&op, ar, bj, cr, mask),
                            )*
                            _ => unreachable!(),
                        }
                    };
                }
                dispatch!(1 2 3 4 5 6);
                r0 += rows;
            }
            j0 += cols;
        }
    }

    struct Operands {
        k: usize,
        a_rs: usize,
        a_cs: usize,
        b_rs: usize,
        c_rs: usize,
        alpha: f32,
        accumulate: bool,
    }

    /// One R × (16·V) block of C; the last vector of each row is masked by `mask`.
    ///
    /// # Safety
    /// As [`gemm_rows`], for the block's R rows and its columns under `mask`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const V: usize>(
        op: &Operands,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        mask: __mmask16,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut ap = a;
        let mut bp = b;
        for _ in 0..op.k {
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = if v + 1 == V {
                    _mm512_maskz_loadu_ps(mask, bp.add(16 * v))
                } else {
                    _mm512_loadu_ps(bp.add(16 * v))
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(r * op.a_rs));
                for (x, &bx) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, bx, *x);
                }
            }
            ap = ap.add(op.a_cs);
            bp = bp.add(op.b_rs);
        }
        let alpha = _mm512_set1_ps(op.alpha);
        for (r, row) in acc.iter().enumerate() {
            let cr = c.add(r * op.c_rs);
            for (v, &x) in row.iter().enumerate() {
                let m = if v + 1 == V { mask } else { 0xffff };
                let p = cr.add(16 * v);
                let mut y = _mm512_mul_ps(alpha, x);
                if op.accumulate {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, p));
                }
                _mm512_mask_storeu_ps(p, m, y);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{gemm_rows, transpose};
    use crate::kernels::matmul::{MatMut, MatRef};
    use crate::kernels::Acc;

    #[test]
    fn transpose_matches_element_by_element_for_edge_shapes() {
        for (rows, cols) in [(1, 1), (8, 8), (64, 32), (13, 21), (7, 40), (33, 8)] {
            let (src_rs, dst_rs) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * src_rs).map(|i| i as f32).collect();
            let mut dst = vec![-1.0f32; cols * dst_rs];
            let mut dv = MatMut::strided(&mut dst, cols, rows, dst_rs);
            transpose(&mut dv, MatRef::strided(&src, rows, cols, src_rs));
            for p in 0..cols {
                for j in 0..dst_rs {
                    let want = if j < rows { src[j * src_rs + p] } else { -1.0 };
                    assert_eq!(dst[p * dst_rs + j], want, "{rows}x{cols} at ({p}, {j})");
                }
            }
        }
    }

    #[test]
    fn matches_a_naive_product_for_every_edge_shape_and_stride() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (m, n, k) in [
            (1, 1, 1),
            (7, 17, 3),
            (13, 64, 64),
            (6, 100, 33),
            (64, 256, 64),
            (8, 19, 300), // k beyond one packed slice of B (AVX2)
        ] {
            for transposed_a in [false, true] {
                for acc in [Acc::Set, Acc::Add] {
                    let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                    let b_rs = n + 3;
                    let b: Vec<f32> = (0..k * b_rs).map(|_| rnd()).collect();
                    let c_rs = n + 5;
                    let c0: Vec<f32> = (0..m * c_rs).map(|_| rnd()).collect();
                    let (a_rs, a_cs) = if transposed_a { (1, m) } else { (k, 1) };
                    let av = if transposed_a {
                        MatRef::new(&a, k, m).t()
                    } else {
                        MatRef::new(&a, m, k)
                    };
                    let mut c = c0.clone();
                    let mut cv = MatMut::strided(&mut c, m, n, c_rs);
                    gemm_rows(&mut cv, av, MatRef::strided(&b, k, n, b_rs), 0.5, acc);
                    for r in 0..m {
                        for j in 0..c_rs {
                            let want = if j < n {
                                let dot: f32 = (0..k)
                                    .map(|p| a[r * a_rs + p * a_cs] * b[p * b_rs + j])
                                    .sum();
                                0.5 * dot + if acc.adds() { c0[r * c_rs + j] } else { 0.0 }
                            } else {
                                c0[r * c_rs + j] // outside the product: untouched
                            };
                            let got = c[r * c_rs + j];
                            assert!(
                                (got - want).abs() < 1e-4,
                                "m{m} n{n} k{k} t{transposed_a} {acc:?} ({r},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
