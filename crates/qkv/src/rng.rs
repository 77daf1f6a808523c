//! Counter-based random numbers.
//!
//! Written by hand rather than taken from `rand`: dropout masks must be a pure function of
//! (seed, element index) so that forward and backward regenerate the same mask without storing
//! it, and so that results do not depend on how rayon splits the work across threads.

/// SplitMix64 finaliser applied to `seed` mixed with `index`.
#[inline(always)]
pub fn hash(seed: u64, index: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 24 bits of precision.
#[inline(always)]
pub fn uniform(seed: u64, index: u64) -> f32 {
    (hash(seed, index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Standard normal via Box–Muller on two counter draws.
pub fn normal(seed: u64, index: u64) -> f32 {
    let u1 = ((hash(seed, 2 * index) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let u2 = (hash(seed, 2 * index + 1) >> 11) as f64 / (1u64 << 53) as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// A small sequential generator for choices made once (initialisation, toy data).
#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    counter: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        hash(self.seed, self.counter)
    }
    pub fn uniform(&mut self) -> f32 {
        self.counter += 1;
        uniform(self.seed, self.counter)
    }
    pub fn normal(&mut self) -> f32 {
        self.counter += 1;
        normal(self.seed, self.counter)
    }
    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}
