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

use super::matmul::{Layout, MatMut};
use super::Acc;

pub(super) mod pack;

use pack::{convert_rows, pack_cols, pack_rows};

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
            crate::simd::has_avx512()
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

thread_local! {
    /// Packing buffers reused across calls on this thread (taken out while in use, so a call
    /// that re-enters through rayon's work stealing allocates its own instead of aliasing).
    static SCRATCH: std::cell::Cell<(Vec<u32>, Vec<u32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// `out (m, n) = [out +] op(a) · op(b)` with both operands rounded to bf16 and f32 sums; the
/// same contract as [`super::matmul::matmul`] (`a` stored (m, k), or (k, m) when
/// [`Layout::Transposed`]; `b` stored (k, n), or (n, k); `out` row-major (m, n)).
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
    a_layout: Layout,
    b_layout: Layout,
    acc: Acc,
) {
    let (a, b) = (Operand::F32(a), Operand::F32(b));
    matmul_bf16_operands(out, a, b, m, k, n, a_layout, b_layout, acc)
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
    a_layout: Layout,
    b_layout: Layout,
    acc: Acc,
) {
    product(out, (a, a_layout), (b, b_layout), (m, k, n), acc, None)
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
    let (x, w) = ((x, Layout::RowMajor), (Operand::F32(w), Layout::Transposed));
    product(y, x, w, (n, i, o), Acc::Set, bias)
}

/// `out (m, n) = [out +] op(a) · op(b) [+ bias]`: both operands packed (or `a` read as it is),
/// then multiplied block by block.
fn product(
    out: &mut [f32],
    (a, a_layout): (Operand, Layout),
    (b, b_layout): (Operand, Layout),
    (m, k, n): (usize, usize, usize),
    acc: Acc,
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
        if acc == Acc::Set {
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
    let direct = direct_left(a, a_layout, m, k);
    let (mut pa_buf, mut pb_buf) = SCRATCH.with(|s| s.take());
    // Grow-only: the packers write every element (padding included), so shrinking and
    // re-growing with `resize` would only add a memset per call.
    let grow = |buf: &mut Vec<u32>, len: usize| {
        if buf.len() < len {
            buf.resize(len, 0);
        }
    };
    let a_len = if direct.is_some() {
        0
    } else {
        m.div_ceil(MR) * kp2 * MR
    };
    let b_len = n.div_ceil(NR) * kp2 * NR;
    grow(&mut pa_buf, a_len);
    grow(&mut pb_buf, b_len);
    let (pa, pb) = (&mut pa_buf[..a_len], &mut pb_buf[..b_len]);
    {
        let _p = crate::profile::scope("matmul bf16 pack");
        if direct.is_none() {
            pack_left(pa, a, a_layout, m, k);
        }
        pack_right(pb, b, b_layout, k, n);
    }
    let (pa, a_panel) = (direct.unwrap_or(pa), a_layout == Layout::Transposed);
    multiply_packed(out, (pa, a_panel), pb, (m, kp2, n), (acc, bias));
    SCRATCH.with(|s| s.set((pa_buf, pb_buf)));
}

/// A bf16 left operand stored (m, k) that already is the packed layout — (blocks, MR, K/2)
/// pairs is row-major bf16 itself — when K is even, it holds whole `MR`-row blocks and its
/// pairs are aligned as u32.
fn direct_left<'a>(a: Operand<'a>, layout: Layout, m: usize, k: usize) -> Option<&'a [u32]> {
    let len = m.div_ceil(MR) * MR * k;
    match a {
        Operand::Bf16(x)
            if layout == Layout::RowMajor
                && k.is_multiple_of(2)
                && x.len() >= len
                && (x.as_ptr() as usize).is_multiple_of(4) =>
        {
            // SAFETY: `len` u16 (checked) are `len / 2` u32 (k even), 4-byte aligned (checked),
            // borrowed as long as `x`.
            Some(unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u32, len / 2) })
        }
        _ => None,
    }
}

/// Pack op(a) (m, k) into `MR`-row blocks. Each layout is read along its contiguous axis: a
/// row-major (m, k) A has its K pairs side by side, a stored (k, m) A its panel lanes.
fn pack_left(pa: &mut [u32], a: Operand, layout: Layout, m: usize, k: usize) {
    match (a, layout) {
        (Operand::F32(a), Layout::Transposed) => pack_cols::<MR, f32>(pa, a, m, m, k),
        (Operand::F32(a), Layout::RowMajor) => convert_rows::<MR, f32>(pa, a, k, m, k),
        (Operand::Bf16(a), Layout::Transposed) => pack_cols::<MR, u16>(pa, a, m, m, k),
        (Operand::Bf16(a), Layout::RowMajor) => convert_rows::<MR, u16>(pa, a, k, m, k),
    }
}

/// Pack op(b) (k, n) into `NR`-column panels, read along its contiguous axis as [`pack_left`].
fn pack_right(pb: &mut [u32], b: Operand, layout: Layout, k: usize, n: usize) {
    match (b, layout) {
        (Operand::F32(b), Layout::Transposed) => pack_rows::<NR, f32>(pb, b, k, n, k),
        (Operand::F32(b), Layout::RowMajor) => pack_cols::<NR, f32>(pb, b, n, n, k),
        (Operand::Bf16(b), Layout::Transposed) => pack_rows::<NR, u16>(pb, b, k, n, k),
        (Operand::Bf16(b), Layout::RowMajor) => pack_cols::<NR, u16>(pb, b, n, n, k),
    }
}

/// `out (m, n) = [out +] pa · pb [+ bias]` over `kp2` K pairs of packed operands (`pa` in
/// panels when `a_panel`, else in row blocks), in tasks over (row block, column block).
fn multiply_packed(
    out: &mut [f32],
    (pa, a_panel): (&[u32], bool),
    pb: &[u32],
    (m, kp2, n): (usize, usize, usize),
    (acc, bias): (Acc, Option<&[f32]>),
) {
    let _p = crate::profile::scope("matmul bf16");
    let (a_panels, b_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    assert!(
        out.len() >= m * n && pa.len() >= a_panels * kp2 * MR && pb.len() >= b_panels * kp2 * NR
    );
    // Row blocks sized so one block of packed A stays in L2 while the task sweeps its columns.
    let mc_panels = (A_BLOCK_BYTES / (kp2 * MR * 4)).clamp(1, a_panels);
    let row_blocks = a_panels.div_ceil(mc_panels);
    let col_blocks = b_panels.div_ceil(NC_PANELS);
    let out_ptr = crate::parallel::SendPtr(out.as_mut_ptr());
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let (ip0, ip1) = (rb * mc_panels, ((rb + 1) * mc_panels).min(a_panels));
        let (jp0, jp1) = (cb * NC_PANELS, ((cb + 1) * NC_PANELS).min(b_panels));
        for jp in jp0..jp1 {
            let bp = &pb[jp * kp2 * NR..(jp + 1) * kp2 * NR];
            let cols = NR.min(n - jp * NR);
            for ip in ip0..ip1 {
                let ap = &pa[ip * kp2 * MR..(ip + 1) * kp2 * MR];
                let rows = MR.min(m - ip * MR);
                let store = Store {
                    ldc: n,
                    rows,
                    cols,
                    accumulate: acc.adds(),
                    bias: bias.map_or(std::ptr::null(), |b| b[jp * NR..].as_ptr()),
                    scale: 1.0,
                };
                // SAFETY: each (ip, jp) block of `out` is written by exactly one task; the
                // block lies inside `out` (rows/cols clipped to m/n, lengths asserted), the
                // operand blocks are slices; the caller asserted `available()`.
                unsafe {
                    let c = out_ptr.get().add(ip * MR * n + jp * NR);
                    if a_panel {
                        kernel::<true>(kp2, ap.as_ptr(), bp.as_ptr(), c, &store);
                    } else {
                        kernel::<false>(kp2, ap.as_ptr(), bp.as_ptr(), c, &store);
                    }
                }
            }
        }
    });
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
/// ([`pack::convert_rows_block`]'s layout, row stride `kp2`), or (K/2, MR) when `A_PANEL`
/// ([`pack::pack_cols_pairs`] with `W = MR`); `b`: panels of `NR` columns, `b_stride` u32
/// apart, each (K/2, NR) with pair `q` at `q · NR` ([`pack::pack_rows_panel`] /
/// [`pack::pack_cols_pairs`] with `W = NR`, or a run of K pairs inside such a panel).
///
/// # Safety
/// [`available`]; `a` holds `m.div_ceil(MR)` blocks and `b` `n.div_ceil(NR)` panels of `kp2`
/// pairs each.
pub(crate) unsafe fn tile_product<const A_PANEL: bool>(
    kp2: usize,
    (a, a_stride): (*const u32, usize),
    (b, b_stride): (*const u32, usize),
    c: &mut MatMut,
    scale: f32,
    acc: Acc,
) {
    assert!(c.cs() == 1, "tile product rows must be contiguous");
    let (m, n, ldc) = (c.nrows(), c.ncols(), c.rs());
    let c = c.ptr();
    // Column panels outside: a panel of B (K/2 · NR · 4 bytes, 4 KB at D = 64) stays in L1
    // while every row block passes over it.
    for jp in 0..n.div_ceil(NR) {
        for ip in 0..m.div_ceil(MR) {
            let store = Store {
                ldc,
                rows: MR.min(m - ip * MR),
                cols: NR.min(n - jp * NR),
                accumulate: acc.adds(),
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
