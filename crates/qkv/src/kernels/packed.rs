//! `y = x · Wᵀ` against weights packed once per decoding session.
//!
//! A decoding step multiplies a few hundred rows (or fewer: batch × beam) by each decoder
//! weight. `gemm` re-packs the weight on every call, which at those row counts costs as much
//! as the product (24.6% of a greedy translation's time went to `gemm`'s packing). Here a
//! weight (N, K) is packed once into column panels of 16 (K × 16 each, zero-padded), and a
//! 6 × 16 AVX2/FMA micro-kernel streams the rows of x against each panel: twelve
//! accumulators, two panel loads and six broadcasts per k.
//!
//! Written by hand because `gemm` has no entry point for an operand packed in advance.
//! Packing is scoped with [`PackedScope`]: while one is installed on a thread, [`try_matmul_packed`]
//! finds a weight's packed copy by its address (packing it on first use), so the layers'
//! code is the same in a step as in a full forward; the scope belongs to one decoding
//! session (a `KvCache`), which is started after the weights last changed.

use super::Acc;
use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// Output columns per panel (two AVX2 registers).
const NR: usize = 16;
/// Rows per micro-kernel call.
const MR: usize = 6;

/// A weight (N, K), row-major as PyTorch stores it, in panels: element (j, p) at
/// `(j / NR) · K · NR + p · NR + j % NR`.
#[derive(Clone, Debug)]
pub struct PackedB {
    pub n: usize,
    pub k: usize,
    data: Vec<f32>,
}

impl PackedB {
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k, "weight smaller than (n, k)");
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0f32; panels * k * NR];
        for (j, row) in w[..n * k].chunks_exact(k).enumerate() {
            let panel = &mut data[(j / NR) * k * NR..][..k * NR];
            for (p, &v) in row.iter().enumerate() {
                panel[p * NR + j % NR] = v;
            }
        }
        Self { n, k, data }
    }
}

/// Whether this CPU runs the packed kernel (AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out (m, n) [+]= x (m, k) · Wᵀ` with W packed in `b`. Panels are shared out over the
/// rayon pool when the product is large enough.
pub fn matmul_packed(out: &mut [f32], x: &[f32], m: usize, b: &PackedB, acc: Acc) {
    let (n, k) = (b.n, b.k);
    assert!(
        out.len() >= m * n && x.len() >= m * k,
        "packed product operand too small"
    );
    assert!(available(), "the packed kernel needs AVX2 and FMA");
    let out_ptr = crate::parallel::SendPtr(out.as_mut_ptr());
    for_each_tile(m, n, k, &|j, i, rows| {
        let cols = NR.min(n - j * NR);
        let panel = &b.data[j * k * NR..][..k * NR];
        // SAFETY: rows i..i+rows and columns j·NR..j·NR+cols of `out` (m, n) lie in `out`
        // (asserted above); one tile alone writes them, so concurrent tiles never touch the
        // same element; x rows i..i+rows hold k floats each.
        unsafe {
            let o = out_ptr.get().add(i * n + j * NR);
            kernel(&x[i * k..], k, rows, panel, o, n, cols, acc.adds());
        }
    });
}

/// Call `tile(panel, first row, rows)` for every tile of MR rows by one panel of an (m, n)
/// product: panel by panel, shared out over the rayon pool when m·n·k is large enough.
fn for_each_tile(m: usize, n: usize, k: usize, tile: &(dyn Fn(usize, usize, usize) + Sync)) {
    let panels = n.div_ceil(NR);
    let run = |j0: usize, j1: usize| {
        for j in j0..j1 {
            let mut i = 0;
            while i < m {
                let rows = MR.min(m - i);
                tile(j, i, rows);
                i += rows;
            }
        }
    };
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 20 && panels > 1 {
        use rayon::prelude::*;
        let per = panels.div_ceil(threads * 4).max(1);
        (0..panels.div_ceil(per))
            .into_par_iter()
            .for_each(|t| run(t * per, ((t + 1) * per).min(panels)));
    } else {
        run(0, panels);
    }
}

/// The int8 products' activations, quantized per row: reused from product to product so a
/// step allocates nothing for them.
#[derive(Clone, Debug, Default)]
pub struct QuantScratch {
    xq: Vec<i16>,
    sx: Vec<f32>,
}

/// A weight (N, K) quantized to int8 values per output column (`scale[j]` · q), stored in
/// pairs for `vpmaddwd` in the panels of [`PackedB`]: the pair (p, p + 1) of column j at
/// `((j / NR) · K2 / 2 + p / 2) · 2·NR + (j % NR) · 2`, K2 = K rounded up to even. Held as
/// i8 and widened to i16 as the kernel loads them (`vpmovsxbw`): a step with few rows is bound
/// by streaming the weights, and i8 halves those bytes against storing i16.
#[derive(Clone, Debug)]
pub struct PackedI8 {
    pub n: usize,
    pub k: usize,
    data: Vec<i8>,
    /// Per column (padded to whole panels with zeros).
    scale: Vec<f32>,
}

impl PackedI8 {
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert!(w.len() >= n * k, "weight smaller than (n, k)");
        let (panels, k2) = (n.div_ceil(NR), k.next_multiple_of(2));
        let mut data = vec![0i8; panels * k2 * NR];
        let mut scale = vec![0.0f32; panels * NR];
        for (j, row) in w[..n * k].chunks_exact(k).enumerate() {
            let s = quant_scale(row);
            scale[j] = s;
            let panel = &mut data[(j / NR) * k2 * NR..][..k2 * NR];
            for (p, &v) in row.iter().enumerate() {
                // |q| ≤ 127 (clamped by `quantize`), so it fits i8.
                panel[(p / 2) * 2 * NR + (j % NR) * 2 + p % 2] = quantize(v, 1.0 / s) as i8;
            }
        }
        Self { n, k, data, scale }
    }
}

/// The symmetric int8 scale of `x`: its largest magnitude maps to 127 (values round to the
/// nearest integer, ties to even).
#[inline(always)]
fn quant_scale(x: &[f32]) -> f32 {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    }
}

/// `v / scale` rounded to an int8 value, as `v · (1 / scale)` (`inv`).
#[inline(always)]
fn quantize(v: f32, inv: f32) -> i16 {
    (v * inv).round_ties_even().clamp(-127.0, 127.0) as i16
}

crate::simd::multiversion! {
    /// Quantize each row of `x` (rows of `k`) into `xq` (rows of `k2`), its scale into `sx`:
    /// vectorized, as it runs before every int8 product of a step.
    fn quantize_rows(x: &[f32], k: usize, k2: usize, xq: &mut [i16], sx: &mut [f32]) {
        for (r, row) in x.chunks_exact(k).enumerate() {
            let s = quant_scale(row);
            sx[r] = s;
            let inv = 1.0 / s;
            for (q, &v) in xq[r * k2..][..k].iter_mut().zip(row) {
                *q = quantize(v, inv);
            }
        }
    }
}

/// `out (m, n) [+]= x (m, k) · Wᵀ` in int8: each row of x quantized to int8 with its own
/// scale (dynamic, as CTranslate2's int8), products summed exactly in i32, the sum scaled
/// back by both scales. `scratch` holds the quantized rows and their scales between calls.
pub fn matmul_packed_i8(
    out: &mut [f32],
    x: &[f32],
    m: usize,
    b: &PackedI8,
    acc: Acc,
    scratch: &mut QuantScratch,
) {
    let (n, k) = (b.n, b.k);
    let k2 = k.next_multiple_of(2);
    assert!(
        out.len() >= m * n && x.len() >= m * k,
        "packed product operand too small"
    );
    assert!(available(), "the packed kernel needs AVX2 and FMA");
    let QuantScratch { xq, sx } = scratch;
    xq.clear();
    xq.resize(m * k2, 0);
    sx.resize(m, 0.0);
    quantize_rows(&x[..m * k], k, k2, xq, sx);
    let (xq, sx) = (&xq[..], &sx[..m]);
    let out_ptr = crate::parallel::SendPtr(out.as_mut_ptr());
    for_each_tile(m, n, k, &|j, i, rows| {
        let cols = NR.min(n - j * NR);
        let panel = &b.data[j * k2 * NR..][..k2 * NR];
        let scales = &b.scale[j * NR..][..NR];
        // SAFETY: as in `matmul_packed`; xq rows i..i+rows hold k2 values each.
        unsafe {
            let o = out_ptr.get().add(i * n + j * NR);
            kernel_i8(
                &xq[i * k2..],
                &sx[i..],
                k2,
                rows,
                panel,
                scales,
                o,
                n,
                cols,
                acc.adds(),
            );
        }
    });
}

/// [`kernel`] for int8 operands.
///
/// # Safety
/// As [`kernel`], with `xq` holding `rows` rows of `k2` values and `sx` their scales.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_i8(
    xq: &[i16],
    sx: &[f32],
    k2: usize,
    rows: usize,
    panel: &[i8],
    scales: &[f32],
    o: *mut f32,
    ldo: usize,
    cols: usize,
    add: bool,
) {
    // SAFETY (each arm): as this function's contract, for the arm's row count.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let t = avx2::TileI8 {
            xq,
            sx,
            k2,
            panel,
            scales,
            o,
            ldo,
            cols,
            add,
        };
        match rows {
            6 => avx2::tile_i8::<6>(t),
            5 => avx2::tile_i8::<5>(t),
            4 => avx2::tile_i8::<4>(t),
            3 => avx2::tile_i8::<3>(t),
            2 => avx2::tile_i8::<2>(t),
            _ => avx2::tile_i8::<1>(t),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernel is only used where `available()`");
}

/// Dispatch on the number of rows so each micro-kernel has its accumulators in registers.
///
/// # Safety
/// `x` holds `rows` rows of `k` floats at stride `k`; `o` points at `rows` rows of at least
/// `cols` writable floats at stride `ldo`; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    x: &[f32],
    k: usize,
    rows: usize,
    panel: &[f32],
    o: *mut f32,
    ldo: usize,
    cols: usize,
    add: bool,
) {
    // SAFETY (each arm): as this function's contract, for the arm's row count.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match rows {
            6 => avx2::tile::<6>(x, k, panel, o, ldo, cols, add),
            5 => avx2::tile::<5>(x, k, panel, o, ldo, cols, add),
            4 => avx2::tile::<4>(x, k, panel, o, ldo, cols, add),
            3 => avx2::tile::<3>(x, k, panel, o, ldo, cols, add),
            2 => avx2::tile::<2>(x, k, panel, o, ldo, cols, add),
            _ => avx2::tile::<1>(x, k, panel, o, ldo, cols, add),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the packed kernel is only used where `available()`");
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::NR;
    use std::arch::x86_64::*;

    /// The operands of one int8 tile (see [`super::kernel_i8`]).
    pub(super) struct TileI8<'a> {
        pub xq: &'a [i16],
        pub sx: &'a [f32],
        pub k2: usize,
        pub panel: &'a [i8],
        pub scales: &'a [f32],
        pub o: *mut f32,
        pub ldo: usize,
        pub cols: usize,
        pub add: bool,
    }

    /// `o[r][c] (+)= sx[r] · scales[c] · Σ_p xq[r][p] · q[p][c]` for r < R, c < cols: pairs
    /// of int8 values (widened to i16 on load) multiplied and added pairwise into i32 by
    /// `vpmaddwd`.
    ///
    /// # Safety
    /// As [`super::kernel_i8`] with `rows = R`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_i8<const R: usize>(t: TileI8) {
        debug_assert!(t.xq.len() >= R * t.k2 && t.panel.len() >= t.k2 * NR);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        let (xp, bp) = (t.xq.as_ptr(), t.panel.as_ptr());
        for p2 in 0..t.k2 / 2 {
            // SAFETY: pair p2 of the panel (2·NR values) and of each row r < R are in
            // bounds (checked above in debug builds; the caller's contract otherwise).
            unsafe {
                let b0 =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(p2 * 2 * NR) as *const __m128i));
                let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                    bp.add(p2 * 2 * NR + NR) as *const __m128i
                ));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair = (xp.add(r * t.k2 + 2 * p2) as *const i32).read_unaligned();
                    let a = _mm256_set1_epi32(pair);
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(a, b0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(a, b1));
                }
            }
        }
        // SAFETY: `scales` holds NR floats; row r < R of `o` has `cols` writable floats.
        unsafe {
            let (s0, s1) = (
                _mm256_loadu_ps(t.scales.as_ptr()),
                _mm256_loadu_ps(t.scales.as_ptr().add(8)),
            );
            for (r, acc) in acc.iter().enumerate() {
                let f = _mm256_set1_ps(t.sx[r]);
                let lo = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[0]), _mm256_mul_ps(s0, f));
                let hi = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[1]), _mm256_mul_ps(s1, f));
                store(t.o.add(r * t.ldo), lo, hi, t.cols, t.add);
            }
        }
    }

    /// Write (or add) the first `cols` of the 16 floats `lo`, `hi` at `dst`.
    ///
    /// # Safety
    /// `dst` has `cols` writable floats.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(dst: *mut f32, mut lo: __m256, mut hi: __m256, cols: usize, add: bool) {
        // SAFETY: the caller's contract.
        unsafe {
            if cols == NR {
                if add {
                    lo = _mm256_add_ps(lo, _mm256_loadu_ps(dst));
                    hi = _mm256_add_ps(hi, _mm256_loadu_ps(dst.add(8)));
                }
                _mm256_storeu_ps(dst, lo);
                _mm256_storeu_ps(dst.add(8), hi);
            } else {
                let mut tmp = [0.0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
                for (c, &v) in tmp[..cols].iter().enumerate() {
                    *dst.add(c) = if add { *dst.add(c) + v } else { v };
                }
            }
        }
    }

    /// `o[r][c] (+)= Σ_p x[r][p] · panel[p][c]` for r < R, c < cols.
    ///
    /// # Safety
    /// As [`super::kernel`] with `rows = R`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(
        x: &[f32],
        k: usize,
        panel: &[f32],
        o: *mut f32,
        ldo: usize,
        cols: usize,
        add: bool,
    ) {
        debug_assert!(x.len() >= (R - 1) * k + k && panel.len() >= k * NR);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (xp, bp) = (x.as_ptr(), panel.as_ptr());
        for p in 0..k {
            // SAFETY: p < k, so the panel row p (NR floats) and x[r][p] for r < R are in
            // bounds (checked above in debug builds; the caller's contract otherwise).
            unsafe {
                let b0 = _mm256_loadu_ps(bp.add(p * NR));
                let b1 = _mm256_loadu_ps(bp.add(p * NR + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*xp.add(r * k + p));
                    acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r < R of `o` has `cols` writable floats (the caller's contract).
            unsafe { store(o.add(r * ldo), acc[0], acc[1], cols, add) };
        }
    }
}

/// The packed weights of one decoding session, by the address and shape of the weight they
/// copy.
#[derive(Clone, Debug, Default)]
pub struct PackedWeights {
    /// Quantize the weights to int8 and run the products in int8 (`--dtype int8`).
    pub int8: bool,
    mats: Vec<(usize, Packed)>,
    /// The int8 products' quantized rows.
    scratch: QuantScratch,
    /// Packs shared with the sessions of other copies of the same parameters (see
    /// [`SharedPacks`]); weights inside `params` are found there by their offset.
    pub shared: Option<Arc<SharedPacks>>,
    /// (address, length) of the parameter buffer the session's steps read.
    params: (usize, usize),
}

/// Packed weights shared by the decoding threads of one call, each running its own copy of
/// the model's parameters: keyed by a weight's offset in its parameter buffer, so every copy
/// finds the same pack. One copy of the decoder's packed weights (13.5 MB for the default
/// translation model) then stays in the shared cache instead of one per thread, and each
/// weight is packed once per call rather than once per batch and thread.
///
/// Valid only while every copy holds the same values: the owner makes one per call, after
/// the copies were refreshed, and drops it before the parameters can change.
#[derive(Debug, Default)]
pub struct SharedPacks {
    mats: Mutex<Vec<(PackKey, Arc<Packed>)>>,
}

/// A shared pack's weight: (offset in the parameters, in floats; n; k; int8).
type PackKey = (usize, usize, usize, bool);

impl SharedPacks {
    /// The pack of the weight at `offset`, packing it now if no session has yet.
    fn get(&self, key: PackKey, w: &[f32]) -> Arc<Packed> {
        // A thread that panicked while packing left no half-made entry (entries are pushed
        // whole), so a poisoned lock's contents are still sound.
        let mut mats = self.mats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = mats.iter().find(|(k, _)| *k == key) {
            return p.clone();
        }
        let (_, n, k, int8) = key;
        let packed = Arc::new(Packed::new(w, n, k, int8));
        mats.push((key, packed.clone()));
        packed
    }
}

#[derive(Clone, Debug)]
enum Packed {
    F32(PackedB),
    I8(PackedI8),
}

impl Packed {
    fn new(w: &[f32], n: usize, k: usize, int8: bool) -> Self {
        if int8 {
            Packed::I8(PackedI8::pack(w, n, k))
        } else {
            Packed::F32(PackedB::pack(w, n, k))
        }
    }

    fn shape(&self) -> (usize, usize) {
        match self {
            Packed::F32(b) => (b.n, b.k),
            Packed::I8(b) => (b.n, b.k),
        }
    }
}

impl PackedWeights {
    /// Weights packed so far.
    pub fn len(&self) -> usize {
        self.mats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mats.is_empty()
    }

    /// The parameter buffer this session's steps read, whose weights [`Self::shared`] packs
    /// by offset.
    pub fn set_params(&mut self, params: &[f32]) {
        self.params = (params.as_ptr() as usize, params.len());
    }
}

thread_local! {
    static ACTIVE: RefCell<Option<PackedWeights>> = const { RefCell::new(None) };
}

/// Installs a session's packed weights on this thread until [`PackedScope::finish`] (or a
/// drop, which discards what was packed meanwhile).
pub struct PackedScope(bool);

impl PackedScope {
    /// Install `weights` (taken out of their session) on this thread; where the CPU has no
    /// packed kernel the scope is inactive, so products go to `gemm` as everywhere else.
    pub fn install(weights: PackedWeights) -> Self {
        if !available() {
            return Self(false);
        }
        ACTIVE.with(|a| *a.borrow_mut() = Some(weights));
        Self(true)
    }

    /// Uninstall, returning the weights (with any packed during the scope) to the session.
    pub fn finish(self) -> PackedWeights {
        let w = ACTIVE.with(|a| a.borrow_mut().take()).unwrap_or_default();
        std::mem::forget(self);
        w
    }
}

impl Drop for PackedScope {
    fn drop(&mut self) {
        if self.0 {
            ACTIVE.with(|a| a.borrow_mut().take());
        }
    }
}

/// While a scope is installed, `out (m, n) [+]= x · Wᵀ` on W's packed copy (packed now if
/// this is its first product of the session). Returns false, doing nothing, when no scope is
/// installed.
pub fn try_matmul_packed(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Acc,
) -> bool {
    ACTIVE.with(|a| {
        let Ok(mut guard) = a.try_borrow_mut() else {
            return false;
        };
        let Some(weights) = guard.as_mut() else {
            return false;
        };
        let addr = w.as_ptr() as usize;
        let (base, len) = weights.params;
        if let Some(shared) = &weights.shared {
            let f32s = std::mem::size_of::<f32>();
            if addr >= base && addr + n * k * f32s <= base + len * f32s {
                let pack = shared.get(((addr - base) / f32s, n, k, weights.int8), w);
                match &*pack {
                    Packed::F32(b) => matmul_packed(out, x, m, b, acc),
                    Packed::I8(b) => matmul_packed_i8(out, x, m, b, acc, &mut weights.scratch),
                }
                return true;
            }
        }
        let found = weights
            .mats
            .iter()
            .position(|(a, b)| *a == addr && b.shape() == (n, k));
        let at = found.unwrap_or_else(|| {
            let packed = Packed::new(w, n, k, weights.int8);
            weights.mats.push((addr, packed));
            weights.mats.len() - 1
        });
        match &weights.mats[at].1 {
            Packed::F32(b) => matmul_packed(out, x, m, b, acc),
            Packed::I8(b) => matmul_packed_i8(out, x, m, b, acc, &mut weights.scratch),
        }
        true
    })
}
