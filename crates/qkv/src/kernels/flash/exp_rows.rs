//! The two exponentiating row passes of the online softmax, which are a sixth of the forward's
//! time. With AVX-512 they are written with intrinsics: `vscalefps` applies 2ⁿ and
//! `vrndscaleps` rounds, which halves the instructions of the portable, auto-vectorized
//! [`simd::exp`] path (kept for other CPUs, and as the tests' reference). With AVX2 the same
//! polynomial builds 2ⁿ in the exponent bits; compiled from the portable loop instead, the
//! exp pass took a fifth of the forward's time on Zen3 (a third of its products' time).

use crate::simd::{self, multiversion};

multiversion! {
    /// One row of the online softmax: `row` holds masked scores (−∞ = hidden); on exit it holds
    /// `exp(score − m_new)` (0 where hidden). Returns (m_new, the factor `exp(m_old − m_new)` that
    /// rescales the running sum and output, and the row's sum).
    fn online_row_portable(row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
        let m_new = simd::max(row).max(m_old);
        if m_new == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = 0.0);
            return (m_new, 1.0, 0.0);
        }
        // One pass: exponentiate and sum, 16 independent lanes so it vectorizes.
        let mut acc = [0.0f32; 16];
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            for l in 0..16 {
                let e = simd::exp(c[l] - m_new);
                let e = if c[l] == f32::NEG_INFINITY { 0.0 } else { e };
                c[l] = e;
                acc[l] += e;
            }
        }
        let mut sum: f32 = 0.0;
        for v in chunks.into_remainder() {
            let e = simd::exp(*v - m_new);
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
            sum += *v;
        }
        let alpha = if m_old == f32::NEG_INFINITY { 0.0 } else { simd::exp(m_old - m_new) };
        (m_new, alpha, sum + acc.iter().sum::<f32>())
    }
}

multiversion! {
    /// `row ← exp(row − lse)` with hidden (−∞) entries 0: the probabilities, recomputed.
    fn probs_row_portable(row: &mut [f32], lse: f32) {
        if lse == f32::NEG_INFINITY {
            row.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        for v in row.iter_mut() {
            let e = simd::exp(*v - lse);
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
        }
    }
}

pub(super) fn online_row(row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = Isa::detect() {
        return isa.online_row(row, m_old);
    }
    online_row_portable(row, m_old)
}

pub(super) fn probs_row(row: &mut [f32], lse: f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = Isa::detect() {
        return isa.probs_row(row, lse);
    }
    probs_row_portable(row, lse)
}

/// The instruction set whose hand-written passes (a row's maximum; its shifted exponentials
/// and their sum) this CPU runs; the softmax logic around them is shared.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Isa {
    Avx512,
    Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Isa {
    fn detect() -> Option<Self> {
        if crate::simd::has_avx512() {
            Some(Isa::Avx512)
        } else if crate::simd::has_avx2() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    fn max(self, row: &[f32]) -> f32 {
        match self {
            // SAFETY: `detect` found AVX-512F on this CPU.
            Isa::Avx512 => unsafe { avx512::row_max(row) },
            // SAFETY: `detect` found AVX2 and FMA on this CPU.
            Isa::Avx2 => unsafe { avx2::row_max(row) },
        }
    }

    /// `row ← exp(row − shift)` (0 where row is −∞); returns the sum.
    fn exp_shifted(self, row: &mut [f32], shift: f32) -> f32 {
        match self {
            // SAFETY: as in `max`.
            Isa::Avx512 => unsafe { avx512::exp_shifted(row, shift) },
            // SAFETY: as in `max`.
            Isa::Avx2 => unsafe { avx2::exp_shifted(row, shift) },
        }
    }

    fn online_row(self, row: &mut [f32], m_old: f32) -> (f32, f32, f32) {
        let m_new = self.max(row).max(m_old);
        if m_new == f32::NEG_INFINITY {
            row.fill(0.0);
            return (m_new, 1.0, 0.0);
        }
        let sum = self.exp_shifted(row, m_new);
        let alpha = if m_old == f32::NEG_INFINITY {
            0.0
        } else {
            (m_old - m_new).exp()
        };
        (m_new, alpha, sum)
    }

    fn probs_row(self, row: &mut [f32], lse: f32) {
        if lse == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        self.exp_shifted(row, lse);
    }
}

/// Every function here needs AVX2 and FMA (`has_avx2()`): that is their safety contract.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// e^x for x ≤ 0, as the AVX-512 version; 2ⁿ is made by adding n to the exponent field of
    /// the polynomial's value p ∈ [0.7, 1.42] (n ≥ −126 after the clamp, so no denormals).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_nonpositive(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_set1_ps(-87.3), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale = _mm256_slli_epi32::<23>(_mm256_cvtps_epi32(n));
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// `row ← exp(row − shift)` (0 where row is −∞); returns the sum. Full vectors here, the
    /// last < 8 elements in scalar code.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        let (sv, ninf) = (_mm256_set1_ps(shift), _mm256_set1_ps(f32::NEG_INFINITY));
        let mut acc = _mm256_setzero_ps();
        let p = row.as_mut_ptr();
        let full = row.len() / 8 * 8;
        for j in (0..full).step_by(8) {
            let x = _mm256_loadu_ps(p.add(j));
            let live = _mm256_cmp_ps::<_CMP_NEQ_UQ>(x, ninf);
            let e = _mm256_and_ps(live, exp_nonpositive(_mm256_sub_ps(x, sv)));
            _mm256_storeu_ps(p.add(j), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut sum = crate::simd::avx2::hsum(acc);
        for v in &mut row[full..] {
            *v = if *v == f32::NEG_INFINITY {
                0.0
            } else {
                crate::simd::exp(*v - shift)
            };
            sum += *v;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_max(row: &[f32]) -> f32 {
        let p = row.as_ptr();
        let full = row.len() / 8 * 8;
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..full).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(j)));
        }
        row[full..].iter().fold(hmax(mx), |a, &b| a.max(b))
    }
}

/// Every function here needs AVX-512F (`has_avx512()`): that is their safety contract.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// e^x for x ≤ 0 (scores minus their maximum), to ~1e−7 relative: n = round(x·log₂e),
    /// r = x − n·ln2 (two-constant Cody–Waite), e^r by its degree-6 Taylor polynomial
    /// (|r| ≤ ln2/2, remainder < 2e−7), then 2ⁿ by `vscalefps`. NaN propagates; inputs below
    /// −87.3 (−∞ included) give ~1e−38, which callers replace by exact zeros.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_nonpositive(x: __m512) -> __m512 {
        let x = _mm512_max_ps(_mm512_set1_ps(-87.3), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[inline]
    fn tail_mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// `row ← exp(row − shift)` (0 where row is −∞); returns the sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
        let (sv, ninf) = (_mm512_set1_ps(shift), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut acc = _mm512_setzero_ps();
        let p = row.as_mut_ptr();
        let mut j = 0;
        while j < row.len() {
            let m = tail_mask(row.len() - j);
            let x = _mm512_maskz_loadu_ps(m, p.add(j));
            let live = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(m, x, ninf);
            let e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(x, sv)));
            _mm512_mask_storeu_ps(p.add(j), m, e);
            acc = _mm512_add_ps(acc, e);
            j += 16;
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn row_max(row: &[f32]) -> f32 {
        let p = row.as_ptr();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j < row.len() {
            let m = tail_mask(row.len() - j);
            mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, p.add(j)));
            j += 16;
        }
        _mm512_reduce_max_ps(mx)
    }
}

#[cfg(test)]
mod tests {
    use super::{online_row, online_row_portable, probs_row, probs_row_portable};

    /// The dispatched row passes (AVX-512 or AVX2, by the CPU and `QKV_ISA`) against the portable
    /// ones (the tests' reference).
    #[test]
    fn dispatched_row_passes_match_the_portable_ones() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 40.0 - 30.0
        };
        for len in [1, 5, 16, 17, 64, 250] {
            let mut row: Vec<f32> = (0..len).map(|_| rnd()).collect();
            for j in (0..len).step_by(3) {
                row[j] = f32::NEG_INFINITY;
            }
            for m_old in [f32::NEG_INFINITY, 3.0, 50.0] {
                let (mut a, mut b) = (row.clone(), row.clone());
                let ra = online_row(&mut a, m_old);
                let rb = online_row_portable(&mut b, m_old);
                assert_eq!(ra.0, rb.0);
                assert!((ra.1 - rb.1).abs() <= 1e-6 * rb.1.abs(), "{ra:?} {rb:?}");
                assert!((ra.2 - rb.2).abs() <= 1e-5 * rb.2.abs(), "{ra:?} {rb:?}");
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-30, "{x} vs {y}");
                }
                for (x, r) in a.iter().zip(&row) {
                    assert_eq!(
                        *r == f32::NEG_INFINITY,
                        *x == 0.0,
                        "masked entries are exact zeros"
                    );
                }
            }
            let lse = 12.0;
            let (mut a, mut b) = (row.clone(), row.clone());
            probs_row(&mut a, lse);
            probs_row_portable(&mut b, lse);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * y.abs() + 1e-30, "{x} vs {y}");
            }
        }
    }
}
