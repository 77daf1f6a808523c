//! The packers of the bf16 products: f32 (rounded on the way) or bf16 operands copied into
//! the pair layouts the micro-kernel reads — panels of `W` rows or columns with K pairs
//! innermost ([`pack_rows`], [`pack_cols`]), or row-major pairs in blocks of `W` rows
//! ([`convert_rows`]). Each is a parallel driver and a one-block function that the bf16
//! attention calls on its own tiles. The conversions need `avx512_bf16`; callers check
//! [`available`](super::available).

use rayon::prelude::*;

use super::{Elem, NR};

/// Two bf16 values in one 32-bit lane, `lo` first in memory: the operand layout of `vdpbf16ps`,
/// which multiplies lane pairs and adds both products into one f32.
#[inline(always)]
fn pair<S: Elem>(lo: S, hi: S) -> u32 {
    lo.bits() | (hi.bits() << 16)
}

/// Pack a row-major (rows, k) matrix (row stride `ld`) into panels of `W` rows: panel `t`
/// holds, for each K pair `q`, the `W` lanes `pair(s[i][2q], s[i][2q+1])` of its rows `i`,
/// zero past `rows` and past `k`. dst: (panels, K/2, W)
pub(super) fn pack_rows<const W: usize, S: Elem>(
    dst: &mut [u32],
    s: &[S],
    ld: usize,
    rows: usize,
    k: usize,
) {
    let kp2 = k.div_ceil(2);
    dst.par_chunks_mut(kp2 * W)
        .enumerate()
        .for_each(|(panel, d)| {
            // SAFETY: the products that call this asserted `available()`.
            unsafe { pack_rows_panel::<W, S>(d, s, ld, panel * W, rows, k) }
        });
}

/// One panel of [`pack_rows`]: rows `[r0, r0 + W)` into `d` (K/2, W).
///
/// # Safety
/// [`available`](super::available).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")
)]
pub(crate) unsafe fn pack_rows_panel<const W: usize, S: Elem>(
    d: &mut [u32],
    s: &[S],
    ld: usize,
    r0: usize,
    rows: usize,
    k: usize,
) {
    // A block of pairs of all `W` rows is converted first, then transposed out of L1 into the
    // panel, so many strided rows' cache misses are in flight at once (BENCHMARKS.md, "bf16
    // flash attention").
    const QB: usize = 64;
    assert!(W <= NR);
    let kp2 = k.div_ceil(2);
    let mut tmp = [0u32; NR * QB];
    let d = &mut d[..kp2 * W];
    for q0 in (0..kp2).step_by(QB) {
        let nq = QB.min(kp2 - q0);
        // Complete pairs in this block; past them at most one half pair (odd k).
        let full = nq.min(k / 2 - q0.min(k / 2));
        for r in 0..W {
            let t = &mut tmp[r * QB..r * QB + nq];
            let i = r0 + r;
            if i >= rows {
                t.fill(0);
                continue;
            }
            let row = &s[i * ld..i * ld + k];
            let src = &row[2 * q0..2 * (q0 + full)];
            let vecs = full / 16;
            for c in 0..vecs {
                cvt::store16(
                    t.as_mut_ptr().add(16 * c),
                    cvt::consecutive32(src.as_ptr().add(32 * c)),
                );
            }
            for (x, xy) in t[16 * vecs..full]
                .iter_mut()
                .zip(src[32 * vecs..].chunks_exact(2))
            {
                *x = pair(xy[0], xy[1]);
            }
            if full < nq {
                t[full] = pair(row[k - 1], S::ZERO);
            }
        }
        for q in 0..nq {
            let out = &mut d[(q0 + q) * W..(q0 + q + 1) * W];
            for (r, x) in out.iter_mut().enumerate() {
                *x = tmp[r * QB + q];
            }
        }
    }
}

/// Convert a row-major (rows, k) matrix (row stride `ld`) into bf16 pairs, row-major, in
/// blocks of `W` rows (zero rows past `rows`, a zero half-pair past an odd `k`): the left
/// operand's layout when it is stored (m, k). One contiguous vectorized pass, no transpose;
/// the micro-kernel broadcasts from `W` row pointers instead. dst: (blocks, W, K/2)
pub(super) fn convert_rows<const W: usize, S: Elem>(
    dst: &mut [u32],
    s: &[S],
    ld: usize,
    rows: usize,
    k: usize,
) {
    let kp2 = k.div_ceil(2);
    dst.par_chunks_mut(kp2 * W)
        .enumerate()
        .for_each(|(block, d)| {
            // SAFETY: the products that call this asserted `available()`.
            unsafe { convert_rows_block(d, s, ld, block * W, rows, k) }
        });
}

/// One block of [`convert_rows`]: rows `[r0, r0 + d.len() / (K/2))` into `d`.
///
/// # Safety
/// [`available`](super::available).
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")
)]
pub(crate) unsafe fn convert_rows_block<S: Elem>(
    d: &mut [u32],
    s: &[S],
    ld: usize,
    r0: usize,
    rows: usize,
    k: usize,
) {
    let kp2 = k.div_ceil(2);
    for (r, out) in d.chunks_exact_mut(kp2).enumerate() {
        let i = r0 + r;
        if i >= rows {
            out.fill(0);
            continue;
        }
        let row = &s[i * ld..i * ld + k];
        // Pairs along K are consecutive floats, so a row of pairs is the row in bf16.
        let full = k / 32;
        for c in 0..full {
            cvt::store16(
                out.as_mut_ptr().add(16 * c),
                cvt::consecutive32(row.as_ptr().add(32 * c)),
            );
        }
        for q in 16 * full..kp2 {
            out[q] = pair(
                row[2 * q],
                if 2 * q + 1 < k {
                    row[2 * q + 1]
                } else {
                    S::ZERO
                },
            );
        }
    }
}

/// Pack a row-major (k, cols) matrix (row stride `ld`) into panels of `W` columns: panel
/// `t` holds, for each K pair `q`, `pair(s[2q][j], s[2q+1][j])` for its columns `j`, zero past
/// `cols` and past `k`. Rows 2q and 2q+1 are read contiguously. dst: (panels, K/2, W)
pub(super) fn pack_cols<const W: usize, S: Elem>(
    dst: &mut [u32],
    s: &[S],
    ld: usize,
    cols: usize,
    k: usize,
) {
    let kp2 = k.div_ceil(2);
    // Tasks take runs of row pairs across all columns, so the source (usually out of L2) is
    // read row after row (BENCHMARKS.md, "bf16 mixed precision").
    let panels = dst.len() / (kp2 * W);
    assert!(dst.len() >= panels * kp2 * W && panels * W >= cols);
    let q_step = kp2.div_ceil(8 * rayon::current_num_threads()).max(4);
    let out = crate::parallel::SendPtr(dst.as_mut_ptr());
    (0..kp2.div_ceil(q_step)).into_par_iter().for_each(|part| {
        let (q0, q1) = (part * q_step, ((part + 1) * q_step).min(kp2));
        // SAFETY: task `part` writes pairs [q0, q1) of every panel: disjoint from every other
        // task, inside `dst` (asserted); the products that call this asserted `available()`.
        unsafe { pack_cols_pairs::<W, S>(out.get(), kp2, panels, q0, q1, s, ld, cols, k) }
    });
}

/// K pairs `[q0, q1)` of every one of `panels` panels of [`pack_cols`] (each (K/2, W), `kp2`
/// pairs) at `dst`.
///
/// # Safety
/// [`available`](super::available); `dst` holds the panels, and no one else touches their
/// pairs `[q0, q1)`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")
)]
pub(crate) unsafe fn pack_cols_pairs<const W: usize, S: Elem>(
    dst: *mut u32,
    kp2: usize,
    panels: usize,
    q0: usize,
    q1: usize,
    s: &[S],
    ld: usize,
    cols: usize,
    k: usize,
) {
    let panel_len = kp2 * W;
    for q in q0..q1 {
        let p = 2 * q;
        let lo = &s[p * ld..p * ld + cols];
        // Past an odd K the second row of the pair is zeros.
        let hi = (p + 1 < k).then(|| &s[(p + 1) * ld..(p + 1) * ld + cols]);
        for t in 0..panels {
            let at = dst.add(t * panel_len + q * W);
            for v in (0..W).step_by(16) {
                let j = t * W + v;
                let lanes = (W - v).min(16);
                // Lanes past `cols` are loaded as zeros, so the panel's padding is zero pairs.
                let valid = lanes.min(cols.saturating_sub(j));
                let x = cvt::interleave(
                    lo.as_ptr().wrapping_add(j),
                    hi.map(|h| h.as_ptr().wrapping_add(j)),
                    valid,
                );
                cvt::store_lanes(at.add(v), lanes, x);
            }
        }
    }
}

/// The packers' conversions: `vcvtne2ps2bf16` rounds 32 floats to bf16 in one instruction
/// (nearest-even, as [`bf16_bits`](crate::kernels::bf16::bf16_bits)), which the integer
/// formulation took ~10 instructions per 16 lanes to do; `vpermw` then interleaves two rows
/// into K pairs.
#[cfg(target_arch = "x86_64")]
mod cvt {
    use std::arch::x86_64::*;

    /// Word `2i` of the result is word `i` of the low row, word `2i + 1` word `i` of the high.
    static INTERLEAVE: [u16; 32] = {
        let mut idx = [0u16; 32];
        let mut i = 0;
        while i < 16 {
            idx[2 * i] = i as u16;
            idx[2 * i + 1] = 16 + i as u16;
            i += 1;
        }
        idx
    };

    /// 32 consecutive elements at `p` as 32 bf16 in memory order (16 pairs).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn consecutive32<S: super::Elem>(p: *const S) -> __m512i {
        if !S::IS_F32 {
            return _mm512_loadu_si512(p as *const _);
        }
        let p = p as *const f32;
        let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        // The second operand fills the low half.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
    }

    /// `n ≤ 16` pairs `(lo[j], hi[j])` (hi = 0 when absent); lanes past `n` are zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn interleave<S: super::Elem>(
        lo: *const S,
        hi: Option<*const S>,
        n: usize,
    ) -> __m512i {
        let m: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
        // Words 0–15: the low row's 16 bf16, words 16–31: the high row's.
        let words: __m512i = if S::IS_F32 {
            let l = _mm512_maskz_loadu_ps(m, lo as *const f32);
            let h = match hi {
                Some(h) => _mm512_maskz_loadu_ps(m, h as *const f32),
                None => _mm512_setzero_ps(),
            };
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l))
        } else {
            let l = _mm256_maskz_loadu_epi16(m, lo as *const i16);
            let h = match hi {
                Some(h) => _mm256_maskz_loadu_epi16(m, h as *const i16),
                None => _mm256_setzero_si256(),
            };
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(l), h)
        };
        _mm512_permutexvar_epi16(_mm512_loadu_si512(INTERLEAVE.as_ptr() as *const _), words)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store16(dst: *mut u32, v: __m512i) {
        _mm512_storeu_si512(dst as *mut _, v)
    }

    /// Store the first `n ≤ 16` lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store_lanes(dst: *mut u32, n: usize, v: __m512i) {
        let m: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
        _mm512_mask_storeu_epi32(dst as *mut i32, m, v)
    }
}

/// Elsewhere the packers are never called ([`available`](crate::kernels::bf16::available) is
/// false); this keeps them compiling.
#[cfg(not(target_arch = "x86_64"))]
mod cvt {
    pub type Lanes = [u32; 16];
    pub unsafe fn consecutive32<S>(_: *const S) -> Lanes {
        unreachable!("bf16 packing on a CPU without avx512_bf16")
    }
    pub unsafe fn interleave<S>(_: *const S, _: Option<*const S>, _: usize) -> Lanes {
        unreachable!("bf16 packing on a CPU without avx512_bf16")
    }
    pub unsafe fn store16(_: *mut u32, _: Lanes) {}
    pub unsafe fn store_lanes(_: *mut u32, _: usize, _: Lanes) {}
}
