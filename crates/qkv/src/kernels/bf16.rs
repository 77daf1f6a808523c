//! bf16 matrix products with f32 accumulation, on the CPU's `avx512_bf16` dot-product instruction.
//!
//! Written by hand because no well-kept crate does it: the `gemm` crate multiplies f32, f64 and
//! f16 but has no bf16 path, and `vdpbf16ps` (two bf16 products summed into each f32 lane) is
//! what doubles the f32 peak on this CPU (~205 → ~410 GFLOP/s on 2 cores, as oneDNN shows).
//!
//! The product is the classic packed GEMM (BLIS/oneDNN): both operands are rounded to bf16
//! (nearest-even) while being copied into panels, the micro-kernel keeps an `MR × NR` block of
//! f32 accumulators in registers for the whole K, and tasks over (row block, column block) run
//! on the rayon pool. Packing is O(M·K + K·N) against O(M·N·K) multiply-adds.
//!
//! Mixed precision in the sense of PyTorch's autocast: parameters, activations and gradients
//! stay f32 in memory; only the operands of the products are bf16 (the part that decides the
//! speed), and the sums are f32. On CPUs without `avx512_bf16` [`matmul_bf16`] is not used:
//! [`super::matmul::matmul`] falls back to f32 (see [`available`]).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of the micro-kernel's accumulator block.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's accumulator block: two 16-lane registers.
pub(crate) const NR: usize = 32;
/// Bytes of one operand block (MC rows × K) that a task keeps in L2 while it sweeps its columns.
const A_BLOCK_BYTES: usize = 256 * 1024;
/// Column panels per task.
const NC_PANELS: usize = 4;

/// Tests of the bf16 paths call this: `true` runs them. Without the instruction they skip
/// (naming `what`), unless `QKV_REQUIRE_BF16` is set — CI sets it on CPUs that have
/// avx512_bf16, where a skip would hide a detection that broke.
#[doc(hidden)]
pub fn run_bf16_test(what: &str) -> bool {
    if available() {
        return true;
    }
    assert!(
        std::env::var_os("QKV_REQUIRE_BF16").is_none(),
        "{what}: QKV_REQUIRE_BF16 is set but avx512_bf16 was not detected"
    );
    eprintln!("skipped {what}: this CPU has no avx512_bf16");
    false
}

/// Whether this CPU has the bf16 dot-product instruction (and AVX-512 F/BW/VL), checked once.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            // BW and VL come with every avx512_bf16 CPU so far; checked because the packers
            // are compiled with them.
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bits of `x`, rounded to nearest-even (NaN stays a quiet NaN), in the low 16 bits.
/// Plain integer arithmetic so the packing loops vectorize.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16
}

/// `x` rounded to bf16 and widened back to f32 (what the products see).
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// What the packers read: f32, rounded to bf16 on the way, or bf16 bits (`u16`) that a
/// producer already rounded (see [`Operand`]).
pub trait Elem: Copy + Send + Sync + 'static {
    /// Whether this is `f32` (the packers pick their vector path with it).
    const IS_F32: bool;
    const ZERO: Self;
    /// The bf16 bits, in the low 16.
    fn bits(self) -> u32;
}

impl Elem for f32 {
    const IS_F32: bool = true;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn bits(self) -> u32 {
        bf16_bits(self)
    }
}

impl Elem for u16 {
    const IS_F32: bool = false;
    const ZERO: Self = 0;
    #[inline(always)]
    fn bits(self) -> u32 {
        self as u32
    }
}

/// A product operand: f32 values, or the bf16 bits of values already rounded, laid out the same
/// way (row-major, the stored shape). A producer that writes its output straight in bf16 (the
/// FFN's activation, forward and backward) spares the product reading twice the bytes and
/// converting them.
#[derive(Clone, Copy, Debug)]
pub enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Operand<'_> {
    pub fn len(&self) -> usize {
        match self {
            Operand::F32(x) => x.len(),
            Operand::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Elements a bf16 buffer of (rows, cols) should hold to be used as a left operand as it is,
/// without a packing pass: the micro-kernel reads whole blocks of `MR` rows.
pub fn padded_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(MR) * MR * cols
}

/// Two bf16 values in one 32-bit lane, `lo` first in memory: the operand layout of `vdpbf16ps`,
/// which multiplies lane pairs and adds both products into one f32.
#[inline(always)]
fn pair<S: Elem>(lo: S, hi: S) -> u32 {
    lo.bits() | (hi.bits() << 16)
}

/// Pack a row-major (rows, k) matrix (row stride `ld`) into panels of `W` rows: panel `t`
/// holds, for each K pair `q`, the `W` lanes `pair(s[i][2q], s[i][2q+1])` of its rows `i`,
/// zero past `rows` and past `k`. dst: (panels, K/2, W)
fn pack_rows<const W: usize, S: Elem>(dst: &mut [u32], s: &[S], ld: usize, rows: usize, k: usize) {
    let kp2 = k.div_ceil(2);
    dst.par_chunks_mut(kp2 * W)
        .enumerate()
        .for_each(|(panel, d)| {
            // SAFETY: only called when `available()` (see `matmul_bf16`).
            unsafe { pack_rows_panel::<W, S>(d, s, ld, panel * W, rows, k) }
        });
}

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
    // A block of pairs of all `W` rows is converted first (contiguous loads, nothing else in
    // the loop, so many rows' cache misses are in flight at once), then transposed out of L1
    // into the panel. Interleaving the two (row by row, each row's pairs stored `W` apart) left
    // the loads waiting: the source rows are usually strided and out of cache (a head's keys).
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
fn convert_rows<const W: usize, S: Elem>(
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
            // SAFETY: as in `pack_rows`.
            unsafe { convert_rows_block(d, s, ld, block * W, rows, k) }
        });
}

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
fn pack_cols<const W: usize, S: Elem>(dst: &mut [u32], s: &[S], ld: usize, cols: usize, k: usize) {
    let kp2 = k.div_ceil(2);
    // Tasks take runs of row pairs across all columns, so the source is read row after row:
    // the operand is usually out of L2 by now, and column strips of rows 3 KB apart (the first
    // version) left the loads waiting on memory.
    let panels = dst.len() / (kp2 * W);
    assert!(dst.len() >= panels * kp2 * W && panels * W >= cols);
    let q_step = kp2.div_ceil(8 * rayon::current_num_threads()).max(4);
    let out = crate::parallel::SendPtr(dst.as_mut_ptr());
    (0..kp2.div_ceil(q_step)).into_par_iter().for_each(|part| {
        let (q0, q1) = (part * q_step, ((part + 1) * q_step).min(kp2));
        // SAFETY: task `part` writes pairs [q0, q1) of every panel: disjoint from every other
        // task, inside `dst` (asserted); `available()` was checked by `matmul_bf16`.
        unsafe { pack_cols_pairs::<W, S>(out.get(), kp2, panels, q0, q1, s, ld, cols, k) }
    });
}

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
/// (nearest-even, as [`bf16_bits`]), which the integer formulation took ~10 instructions per
/// 16 lanes to do; `vpermw` then interleaves two rows into K pairs.
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

/// Elsewhere the packers are never called ([`available`] is false); this keeps them compiling.
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

thread_local! {
    /// Packing buffers reused across calls on this thread (taken out while in use, so a call
    /// that re-enters through rayon's work stealing allocates its own instead of aliasing).
    static SCRATCH: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `out (m, n) = [out +] op(a) · op(b)` with both operands rounded to bf16 and f32 sums; the
/// same contract as [`super::matmul::matmul`] (`a` stored (m, k), or (k, m) when `ta`; `b`
/// stored (k, n), or (n, k) when `tb`; `out` row-major (m, n)).
///
/// # Panics
/// If [`available`] is false, or an operand is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(
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
    matmul_bf16_operands(
        out,
        Operand::F32(a),
        Operand::F32(b),
        m,
        k,
        n,
        ta,
        tb,
        accumulate,
    )
}

/// [`matmul_bf16`] with operands that may already be bf16. A bf16 left operand stored (m, k)
/// with even k and [`padded_len`] elements is read as it is, with no packing pass at all.
///
/// # Panics
/// If [`available`] is false, or an operand is shorter than its shape.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_operands(
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
    product(out, a, b, m, k, n, ta, tb, accumulate, None)
}

/// A linear layer's forward in bf16, `y = x Wᵀ + b`, with the bias added as the micro-kernel
/// stores its block (one pass over y less than a separate bias pass).
/// x: (N, I) stored; w: (O, I); bias: (O); y: (N, O)
///
/// # Panics
/// As [`matmul_bf16`], or if the bias is not (O).
pub fn linear_bf16(
    y: &mut [f32],
    x: Operand,
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    i: usize,
    o: usize,
) {
    assert!(
        bias.is_none_or(|b| b.len() == o),
        "bias length is not the output width"
    );
    product(y, x, Operand::F32(w), n, i, o, false, true, false, bias)
}

#[allow(clippy::too_many_arguments)]
fn product(
    out: &mut [f32],
    a: Operand,
    b: Operand,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
    bias: Option<&[f32]>,
) {
    assert!(available(), "matmul_bf16 needs avx512_bf16");
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul operand too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
            if let Some(b) = bias {
                out[..m * n]
                    .chunks_exact_mut(n)
                    .for_each(|r| r.copy_from_slice(b));
            }
        }
        return;
    }
    let kp2 = k.div_ceil(2);
    let (a_panels, b_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // (blocks, MR, K/2) pairs, the left operand's packed layout, is row-major bf16 itself.
    let a_direct = match a {
        Operand::Bf16(x)
            if !ta
                && k.is_multiple_of(2)
                && x.len() >= a_panels * MR * k
                && (x.as_ptr() as usize).is_multiple_of(4) =>
        {
            Some(x)
        }
        _ => None,
    };
    let (mut pa_buf, mut pb_buf) = SCRATCH.with(|s| s.take());
    // Grow-only: the packers write every element (padding included), so shrinking and
    // re-growing with `resize` would only add a memset per call.
    let a_len = if a_direct.is_some() {
        0
    } else {
        a_panels * kp2 * MR
    };
    let b_len = b_panels * kp2 * NR;
    if pa_buf.len() < a_len {
        pa_buf.resize(a_len, 0);
    }
    if pb_buf.len() < b_len {
        pb_buf.resize(b_len, 0);
    }
    let (pa, pb) = (&mut pa_buf[..a_len], &mut pb_buf[..b_len]);
    {
        let _p = crate::profile::scope("matmul bf16 pack");
        // Each operand is read along its contiguous axis: a row-major (m, k) A and a stored
        // (n, k) B have their K pairs side by side, the other layouts their panel lanes.
        match (a, ta) {
            _ if a_direct.is_some() => {}
            (Operand::F32(a), true) => pack_cols::<MR, f32>(pa, a, m, m, k),
            (Operand::F32(a), false) => convert_rows::<MR, f32>(pa, a, k, m, k),
            (Operand::Bf16(a), true) => pack_cols::<MR, u16>(pa, a, m, m, k),
            (Operand::Bf16(a), false) => convert_rows::<MR, u16>(pa, a, k, m, k),
        }
        match (b, tb) {
            (Operand::F32(b), true) => pack_rows::<NR, f32>(pb, b, k, n, k),
            (Operand::F32(b), false) => pack_cols::<NR, f32>(pb, b, n, n, k),
            (Operand::Bf16(b), true) => pack_rows::<NR, u16>(pb, b, k, n, k),
            (Operand::Bf16(b), false) => pack_cols::<NR, u16>(pb, b, n, n, k),
        }
    }
    let _p = crate::profile::scope("matmul bf16");
    // Row blocks sized so one block of packed A stays in L2 while the task sweeps its columns.
    let mc_panels = (A_BLOCK_BYTES / (kp2 * MR * 4)).clamp(1, a_panels);
    let row_blocks = a_panels.div_ceil(mc_panels);
    let col_blocks = b_panels.div_ceil(NC_PANELS);
    let out_ptr = crate::parallel::SendPtr(out.as_mut_ptr());
    let pa_ref: &[u32] = match a_direct {
        // SAFETY: u16 pairs read as u32 lanes (4-byte aligned, checked);
        // `a_panels · MR · k` u16 are `a_panels · MR · kp2` u32 (k even, checked).
        Some(x) => unsafe {
            std::slice::from_raw_parts(x.as_ptr() as *const u32, a_panels * MR * kp2)
        },
        None => &*pa,
    };
    let pb_ref = &*pb;
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let (ip0, ip1) = (rb * mc_panels, ((rb + 1) * mc_panels).min(a_panels));
        let (jp0, jp1) = (cb * NC_PANELS, ((cb + 1) * NC_PANELS).min(b_panels));
        for jp in jp0..jp1 {
            let bp = &pb_ref[jp * kp2 * NR..(jp + 1) * kp2 * NR];
            let cols = NR.min(n - jp * NR);
            for ip in ip0..ip1 {
                let ap = &pa_ref[ip * kp2 * MR..(ip + 1) * kp2 * MR];
                let rows = MR.min(m - ip * MR);
                // SAFETY: each (ip, jp) block of `out` is written by exactly one task; the
                // block lies inside `out` (rows/cols clipped to m/n, checked lengths above);
                // `available()` was asserted.
                unsafe {
                    let c = out_ptr.get().add(ip * MR * n + jp * NR);
                    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().add(jp * NR));
                    let store = Store {
                        ldc: n,
                        rows,
                        cols,
                        accumulate,
                        bias,
                        scale: 1.0,
                    };
                    if ta {
                        kernel::<true>(kp2, ap.as_ptr(), bp.as_ptr(), c, &store);
                    } else {
                        kernel::<false>(kp2, ap.as_ptr(), bp.as_ptr(), c, &store);
                    }
                }
            }
        }
    });
    SCRATCH.with(|s| s.set((pa_buf, pb_buf)));
}

/// How the micro-kernel stores its block: `rows` rows of `cols` (≤ NR) floats, `ldc` apart,
/// `scale ·` the sums, plus `bias[j]` per column unless null, added onto what is there when
/// `accumulate`.
struct Store {
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
    bias: *const f32,
    scale: f32,
}

/// One thread's product of operands already packed (the bf16 attention's tile products, whose
/// operands are packed once per head and reused by every tile):
/// `c (m, n) = [c +] scale · A · B` over `kp2` K pairs.
/// `a`: blocks of `MR` rows, `a_stride` u32 apart, each (MR, K/2) row pairs
/// ([`convert_rows_block`]'s layout, row stride `kp2`), or (K/2, MR) when `A_PANEL`
/// ([`pack_cols_pairs`] with `W = MR`); `b`: panels of `NR` columns, `b_stride` u32 apart, each
/// (K/2, NR) with pair `q` at `q · NR` ([`pack_rows_panel`] / [`pack_cols_pairs`] with
/// `W = NR`, or a run of K pairs inside such a panel).
///
/// # Safety
/// [`available`]; `a` holds `m.div_ceil(MR)` blocks and `b` `n.div_ceil(NR)` panels of `kp2`
/// pairs each; `c` addresses `m` rows of `n` floats, `ldc` apart, that no one else touches.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_product<const A_PANEL: bool>(
    (m, n, kp2): (usize, usize, usize),
    (a, a_stride): (*const u32, usize),
    (b, b_stride): (*const u32, usize),
    c: *mut f32,
    ldc: usize,
    scale: f32,
    accumulate: bool,
) {
    // Column panels outside: a panel of B (K/2 · NR · 4 bytes, 4 KB at D = 64) stays in L1
    // while every row block passes over it.
    for jp in 0..n.div_ceil(NR) {
        for ip in 0..m.div_ceil(MR) {
            let store = Store {
                ldc,
                rows: MR.min(m - ip * MR),
                cols: NR.min(n - jp * NR),
                accumulate,
                bias: std::ptr::null(),
                scale,
            };
            kernel::<A_PANEL>(
                kp2,
                a.add(ip * a_stride),
                b.add(jp * b_stride),
                c.add(ip * MR * ldc + jp * NR),
                &store,
            );
        }
    }
}

/// `c (rows, cols) = [c +] scale · a_block · b_panel [+ bias]` over all `kp2` K pairs.
/// a_block: (K/2, MR) pairs when `A_PANEL`, else (MR, K/2); b_panel: (K/2, NR) pairs.
///
/// # Safety
/// The CPU has avx512f and avx512bf16; the panels hold `kp2` pairs; `c` addresses `rows`
/// rows of `cols` (≤ NR) valid, unshared floats; a non-null bias holds `cols` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const A_PANEL: bool>(
    kp2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    st: &Store,
) {
    let Store {
        ldc,
        rows,
        cols,
        accumulate,
        bias,
        scale,
    } = *st;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for q in 0..kp2 {
        let bq = b.add(q * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bq.add(16) as *const _));
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let at = if A_PANEL { q * MR + r } else { r * kp2 + q };
            let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(at) as i32));
            acc_r[0] = _mm512_dpbf16_ps(acc_r[0], ar, b0);
            acc_r[1] = _mm512_dpbf16_ps(acc_r[1], ar, b1);
        }
    }
    let m0: __mmask16 = if cols >= 16 {
        0xFFFF
    } else {
        (1u32 << cols) as u16 - 1
    };
    let m1: __mmask16 = if cols >= 32 {
        0xFFFF
    } else if cols > 16 {
        (1u32 << (cols - 16)) as u16 - 1
    } else {
        0
    };
    let (b0, b1) = if bias.is_null() {
        (_mm512_setzero_ps(), _mm512_setzero_ps())
    } else {
        (
            _mm512_maskz_loadu_ps(m0, bias),
            _mm512_maskz_loadu_ps(m1, bias.wrapping_add(16)),
        )
    };
    let sv = _mm512_set1_ps(scale);
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let cr = c.add(r * ldc);
        let (mut v0, mut v1) = (
            _mm512_fmadd_ps(acc_r[0], sv, b0),
            _mm512_fmadd_ps(acc_r[1], sv, b1),
        );
        if accumulate {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cr.wrapping_add(16)));
        }
        // Masked-off lanes are never touched, so the second half may point past a narrow edge.
        _mm512_mask_storeu_ps(cr, m0, v0);
        _mm512_mask_storeu_ps(cr.wrapping_add(16), m1, v1);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const A_PANEL: bool>(
    _kp2: usize,
    _a: *const u32,
    _b: *const u32,
    _c: *mut f32,
    _st: &Store,
) {
    unreachable!("bf16 kernel on a CPU without avx512_bf16")
}
