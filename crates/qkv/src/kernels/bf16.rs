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
const MR: usize = 12;
/// Columns of the micro-kernel's accumulator block: two 16-lane registers.
const NR: usize = 32;
/// Bytes of one operand block (MC rows × K) that a task keeps in L2 while it sweeps its columns.
const A_BLOCK_BYTES: usize = 256 * 1024;
/// Column panels per task.
const NC_PANELS: usize = 4;
/// Columns one column-packing task converts per row pair (a stack buffer of this many lanes).
const GROUP_COLS: usize = 128;
const _: () = assert!(MR <= GROUP_COLS && NR <= GROUP_COLS);

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

/// Two bf16 values in one 32-bit lane, `lo` first in memory: the operand layout of `vdpbf16ps`,
/// which multiplies lane pairs and adds both products into one f32.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// Pack a row-major (rows, k) matrix (row stride `ld`) into panels of `W` rows: panel `t`
/// holds, for each K pair `q`, the `W` lanes `pair(s[i][2q], s[i][2q+1])` of its rows `i`,
/// zero past `rows` and past `k`. dst: (panels, K/2, W)
fn pack_rows<const W: usize>(dst: &mut [u32], s: &[f32], ld: usize, rows: usize, k: usize) {
    let kp2 = k.div_ceil(2);
    dst.par_chunks_mut(kp2 * W)
        .enumerate()
        .for_each(|(panel, d)| {
            // SAFETY: only called when `available()` (see `matmul_bf16`).
            unsafe { pack_rows_panel::<W>(d, s, ld, panel * W, rows, k) }
        });
}

#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl")
)]
unsafe fn pack_rows_panel<const W: usize>(
    d: &mut [u32],
    s: &[f32],
    ld: usize,
    r0: usize,
    rows: usize,
    k: usize,
) {
    // Pairs are converted a block at a time into a small contiguous buffer (a vectorized pass),
    // then spread at the panel's stride.
    const BLOCK: usize = 256;
    let kp2 = k.div_ceil(2);
    let mut tmp = [0u32; BLOCK];
    let d = &mut d[..kp2 * W];
    for r in 0..W {
        let i = r0 + r;
        if i >= rows {
            (0..kp2).for_each(|q| d[q * W + r] = 0);
            continue;
        }
        let row = &s[i * ld..i * ld + k];
        for q0 in (0..kp2).step_by(BLOCK) {
            let nq = BLOCK.min(kp2 - q0);
            let full = nq.min(k / 2 - q0.min(k / 2));
            let src = &row[2 * q0..2 * (q0 + full)];
            for (t, xy) in tmp[..full].iter_mut().zip(src.chunks_exact(2)) {
                *t = pair(xy[0], xy[1]);
            }
            if full < nq {
                tmp[full] = pair(row[k - 1], 0.0);
            }
            for (q, &t) in tmp[..nq].iter().enumerate() {
                d[(q0 + q) * W + r] = t;
            }
        }
    }
}

/// Convert a row-major (rows, k) matrix (row stride `ld`) into bf16 pairs, row-major, in
/// blocks of `W` rows (zero rows past `rows`, a zero half-pair past an odd `k`): the left
/// operand's layout when it is stored (m, k). One contiguous vectorized pass, no transpose;
/// the micro-kernel broadcasts from `W` row pointers instead. dst: (blocks, W, K/2)
fn convert_rows<const W: usize>(dst: &mut [u32], s: &[f32], ld: usize, rows: usize, k: usize) {
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
    target_feature(enable = "avx512f,avx512bw,avx512vl")
)]
unsafe fn convert_rows_block(
    d: &mut [u32],
    s: &[f32],
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
        for (o, xy) in out.iter_mut().zip(row.chunks_exact(2)) {
            *o = pair(xy[0], xy[1]);
        }
        if k % 2 == 1 {
            out[kp2 - 1] = pair(row[k - 1], 0.0);
        }
    }
}

/// Pack a row-major (k, cols) matrix (row stride `ld`) into panels of `W` columns: panel
/// `t` holds, for each K pair `q`, `pair(s[2q][j], s[2q+1][j])` for its columns `j`, zero past
/// `cols` and past `k`. Rows 2q and 2q+1 are read contiguously. dst: (panels, K/2, W)
fn pack_cols<const W: usize>(dst: &mut [u32], s: &[f32], ld: usize, cols: usize, k: usize) {
    let kp2 = k.div_ceil(2);
    // Panels are handled in groups ~GROUP_COLS columns wide, so that each row pair is converted
    // in one long vectorized pass before being split into panels; groups are also split along
    // K, or a narrow operand (256 columns: two groups) would keep one of two threads idle.
    let group = (GROUP_COLS / W).max(1);
    let panels = dst.len() / (kp2 * W);
    let groups = panels.div_ceil(group);
    let k_parts = (4 * rayon::current_num_threads())
        .div_ceil(groups)
        .clamp(1, kp2.div_ceil(64));
    let q_step = kp2.div_ceil(k_parts);
    assert!(dst.len() >= panels * kp2 * W);
    let out = crate::parallel::SendPtr(dst.as_mut_ptr());
    (0..groups * k_parts).into_par_iter().for_each(|t| {
        let (g, part) = (t / k_parts, t % k_parts);
        let (q0, q1) = (part * q_step, ((part + 1) * q_step).min(kp2));
        let first = g * group;
        let n_panels = group.min(panels - first);
        // SAFETY: task (g, part) writes pairs [q0, q1) of panels [first, first + n_panels):
        // disjoint from every other task, inside `dst` (asserted); `available()` was checked
        // by `matmul_bf16`.
        unsafe { pack_cols_group::<W>(out.get(), kp2, first, n_panels, q0, q1, s, ld, cols, k) }
    });
}

#[allow(clippy::too_many_arguments)]
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx512f,avx512bw,avx512vl")
)]
unsafe fn pack_cols_group<const W: usize>(
    dst: *mut u32,
    kp2: usize,
    first: usize,
    n_panels: usize,
    q0: usize,
    q1: usize,
    s: &[f32],
    ld: usize,
    cols: usize,
    k: usize,
) {
    let panel_len = kp2 * W;
    let j0 = first * W;
    let w = (n_panels * W).min(cols.saturating_sub(j0));
    // A group spans at most GROUP_COLS lanes (see `pack_cols`); lanes past `cols` stay zero.
    let mut tmp = [0u32; GROUP_COLS];
    let tmp = &mut tmp[..n_panels * W];
    for q in q0..q1 {
        let p = 2 * q;
        let lo = &s[p * ld + j0..p * ld + j0 + w];
        if p + 1 < k {
            let hi = &s[(p + 1) * ld + j0..(p + 1) * ld + j0 + w];
            for ((o, &x), &y) in tmp[..w].iter_mut().zip(lo).zip(hi) {
                *o = pair(x, y);
            }
        } else {
            for (o, &x) in tmp[..w].iter_mut().zip(lo) {
                *o = pair(x, 0.0);
            }
        }
        for (t, lanes) in tmp.chunks_exact(W).enumerate() {
            let at = (first + t) * panel_len + q * W;
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst.add(at), W);
        }
    }
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
        }
        return;
    }
    let kp2 = k.div_ceil(2);
    let (a_panels, b_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (mut pa_buf, mut pb_buf) = SCRATCH.with(|s| s.take());
    // Grow-only: the packers write every element (padding included), so shrinking and
    // re-growing with `resize` would only add a memset per call.
    let (a_len, b_len) = (a_panels * kp2 * MR, b_panels * kp2 * NR);
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
        if ta {
            pack_cols::<MR>(pa, a, m, m, k);
        } else {
            convert_rows::<MR>(pa, a, k, m, k);
        }
        if tb {
            pack_rows::<NR>(pb, b, k, n, k);
        } else {
            pack_cols::<NR>(pb, b, n, n, k);
        }
    }
    let _p = crate::profile::scope("matmul bf16");
    // Row blocks sized so one block of packed A stays in L2 while the task sweeps its columns.
    let mc_panels = (A_BLOCK_BYTES / (kp2 * MR * 4)).clamp(1, a_panels);
    let row_blocks = a_panels.div_ceil(mc_panels);
    let col_blocks = b_panels.div_ceil(NC_PANELS);
    let out_ptr = crate::parallel::SendPtr(out.as_mut_ptr());
    let (pa_ref, pb_ref) = (&*pa, &*pb);
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
                    if ta {
                        kernel::<true>(kp2, ap.as_ptr(), bp.as_ptr(), c, n, rows, cols, accumulate);
                    } else {
                        kernel::<false>(
                            kp2,
                            ap.as_ptr(),
                            bp.as_ptr(),
                            c,
                            n,
                            rows,
                            cols,
                            accumulate,
                        );
                    }
                }
            }
        }
    });
    SCRATCH.with(|s| s.set((pa_buf, pb_buf)));
}

/// `c (rows, cols) = [c +] a_block · b_panel` over all `kp2` K pairs.
/// a_block: (K/2, MR) pairs when `A_PANEL`, else (MR, K/2); b_panel: (K/2, NR) pairs;
/// c: row stride `ldc`.
///
/// # Safety
/// The CPU has avx512f and avx512bf16; the panels hold `kp2` pairs; `c` addresses `rows`
/// rows of `cols` (≤ NR) valid, unshared floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const A_PANEL: bool>(
    kp2: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
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
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let cr = c.add(r * ldc);
        let (mut v0, mut v1) = (acc_r[0], acc_r[1]);
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
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const A_PANEL: bool>(
    _kp2: usize,
    _a: *const u32,
    _b: *const u32,
    _c: *mut f32,
    _ldc: usize,
    _rows: usize,
    _cols: usize,
    _accumulate: bool,
) {
    unreachable!("bf16 kernel on a CPU without avx512_bf16")
}
