//! Runtime CPU dispatch for the elementwise kernels, and vectorizable math.
//!
//! The shipped binary targets baseline x86-64, so hot loops are compiled two more times with
//! `#[target_feature]` (AVX-512, AVX2+FMA) and chosen at run time by `multiversion!`.
//! The loop bodies are plain Rust written so the compiler vectorizes them (independent lanes,
//! no libm calls); `exp` below is hand-written because libm's `expf` is a scalar call that
//! blocks vectorization of the softmax.

/// Define `fn name(args) -> ret { body }` compiled for AVX-512, AVX2+FMA and baseline, picking
/// the best at run time. Arguments must be plain values or references (no `impl Trait`).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports the enabled features (checked at run time).
                    return unsafe { v4($($arg),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// The instruction sets `QKV_ISA` may name, lowest first.
const ISAS: [&str; 3] = ["baseline", "avx2", "avx512"];

/// The highest instruction set dispatched kernels may use: `QKV_ISA` (baseline | avx2 |
/// avx512) lowers it from the CPU's best, so an AVX-512 machine measures and tests the AVX2
/// path. Unset, or a name that is not one of those (see [`isa_request_error`]), allows all.
/// (The `gemm` crate's own dispatch is not affected.)
fn isa_cap() -> usize {
    use std::sync::OnceLock;
    static CAP: OnceLock<usize> = OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("QKV_ISA")
            .ok()
            .and_then(|v| ISAS.iter().position(|&n| n == v.trim()))
            .unwrap_or(ISAS.len() - 1)
    })
}

/// Why `QKV_ISA` cannot be honoured here (a name that is not an instruction set, or one this
/// CPU lacks), for the binary to report before running anything.
pub fn isa_request_error() -> Option<String> {
    let v = std::env::var("QKV_ISA").ok()?;
    let Some(asked) = ISAS.iter().position(|&n| n == v.trim()) else {
        return Some(format!("QKV_ISA={v}: expected one of {}", ISAS.join(", ")));
    };
    let best = cpu_isa();
    (asked > best).then(|| format!("QKV_ISA={v}: this CPU's best is {}", ISAS[best]))
}

/// The best instruction set of this CPU, as an index into `ISAS`.
fn cpu_isa() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
        {
            return 2;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return 1;
        }
    }
    0
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx512() -> bool {
    isa_cap() >= 2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2() -> bool {
    isa_cap() >= 1 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// The instruction set the multiversioned kernels run on this CPU ("avx512", "avx2" or
/// "baseline"; `QKV_ISA` may lower it), for benchmark reports.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return "avx512";
        }
        if has_avx2() {
            return "avx2";
        }
    }
    "baseline"
}

/// The instruction set the `gemm` crate's f32 products run (its own dispatch, which
/// `QKV_ISA` does not reach: the crate offers no switch), for benchmark reports. It mirrors
/// the crate's choice with the `x86-v4` feature this workspace enables: AVX-512F, else FMA.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "baseline"
}

const LANES: usize = 16;

/// Σ x, with 16 independent accumulators so the loop vectorizes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ x·y, vectorized as [`sum`].
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    acc.iter().sum::<f32>() + xr.iter().zip(yr).map(|(a, b)| a * b).sum::<f32>()
}

/// Σ e^(x − shift), vectorized as [`sum`].
#[inline(always)]
pub fn sum_exp(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp(c[l] - shift);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| exp(v - shift)).sum::<f32>()
}

/// max x (NaN-ignoring), vectorized as [`sum`].
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let m = acc
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    rest.iter().fold(m, |a, &b| if b > a { b } else { a })
}

/// ln 2 = LN2_HI + LN2_LO, the first with few enough mantissa bits that n·LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x to ~2 ulp (Cephes `expf` polynomial), branch-free so loops over it vectorize.
/// Inputs below −87.3 give ~1e−38 rather than 0; NaN propagates.
#[allow(clippy::excessive_precision)] // the coefficients as published
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits: n both as a float and,
    // by reinterpreting the bits, as an integer. (`as i32` on a float is a saturating
    // conversion the compiler cannot vectorize.)
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(ni.wrapping_add(127) << 23)
}

/// erf(x) to ~4e-7 absolute, branch-free so loops over it vectorize (libm's `erff` is a scalar
/// call, and exact GELU spends most of its time there). The rational approximation
/// x·P(x²)/Q(x²) on [−4, 4] (beyond which erf is ±1 in f32) with the coefficients that Eigen
/// and XLA use for single-precision erf.
#[allow(clippy::excessive_precision)] // the coefficients as published
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906e-4;
    p = p * x2 - 2.954_599_8e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// ln x to a few ulp (Cephes `logf` polynomial), branch-free so loops over it vectorize
/// (libm's `logf` is a scalar call). Inputs below the smallest normal float (zero, subnormals,
/// negatives) give ln(1.18e−38) ≈ −87.3, the floor [`exp`] has; NaN propagates; +∞ is not
/// handled (finite inputs only).
#[allow(clippy::excessive_precision)] // the coefficients as published
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let v = if x < f32::MIN_POSITIVE {
        f32::MIN_POSITIVE
    } else {
        x
    };
    // v = m·2^e with m in [0.5, 1): the exponent field, and the mantissa under exponent −1.
    let bits = v.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    // Keep the polynomial's argument in [√½ − 1, √2 − 1).
    let small = m < SQRT_HALF;
    e -= small as i32;
    let r = if small { m + m - 1.0 } else { m - 1.0 };
    let e = e as f32;
    let z = r * r;
    let mut p = 7.037_683_6e-2f32;
    p = p * r - 1.151_461e-1;
    p = p * r + 1.167_699_9e-1;
    p = p * r - 1.242_014_1e-1;
    p = p * r + 1.424_932_3e-1;
    p = p * r - 1.666_805_8e-1;
    p = p * r + 2.000_071_5e-1;
    p = p * r - 2.499_999_4e-1;
    p = p * r + 3.333_333_1e-1;
    let y = p * r * z + LN2_LO * e - 0.5 * z;
    let out = r + y + LN2_HI * e;
    if x.is_nan() {
        x
    } else {
        out
    }
}

/// Helpers shared by the hand-written AVX2 kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Σ of the eight lanes of `v`.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_matches_libm_to_half_a_micro() {
        let mut worst = 0.0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((super::erf(x) - libm::erff(x)).abs());
            x += 1e-4;
        }
        assert!(worst < 5e-7, "max |erf − erff| = {worst}");
        assert!(super::erf(f32::NAN).is_nan());
        assert_eq!(super::erf(0.0), 0.0);
    }

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(super::exp(f32::NAN).is_nan());
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn ln_matches_f64_to_a_few_ulp() {
        let mut worst = 0.0f64;
        // Every binade from the smallest normal to the largest, 4,099 points each.
        let mut x = f32::MIN_POSITIVE;
        while x.is_finite() {
            for i in 0..4099 {
                let v = x * (1.0 + i as f32 / 4099.0);
                let (a, b) = (super::ln(v) as f64, (v as f64).ln());
                worst = worst.max((a - b).abs() / b.abs().max(1.0));
            }
            x *= 2.0;
        }
        assert!(worst < 3e-7, "worst error {worst}");
        assert_eq!(super::ln(1.0), 0.0);
        assert!(super::ln(f32::NAN).is_nan());
        let floor = super::ln(f32::MIN_POSITIVE);
        assert!((floor as f64 - (f32::MIN_POSITIVE as f64).ln()).abs() < 1e-5);
        for below in [0.0, 1e-40, -1.0] {
            assert_eq!(super::ln(below), floor, "{below}");
        }
    }

    #[test]
    fn reductions_match_scalar() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        assert!((super::sum(&x) - x.iter().sum::<f32>()).abs() < 1e-5);
        assert!(
            (super::dot(&x, &y) - x.iter().zip(&y).map(|(a, b)| a * b).sum::<f32>()).abs() < 1e-5
        );
        assert_eq!(
            super::max(&x),
            x.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
        );
    }
}
