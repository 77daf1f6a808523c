//! Seeded inverted dropout (Srivastava et al., 2014). The keep mask is a pure function of
//! (seed, element index), so backward regenerates it instead of storing it, and the result
//! does not depend on the thread split.

use crate::rng;
use rayon::prelude::*;

/// Drop probability `p` with a per-call seed. `p == 0` is represented by `None` at call sites.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
    /// Index of the buffer's first element in the mask (a row shard of a larger batch).
    pub offset: u64,
}

impl Dropout {
    /// `Some` only when the probability is positive: a zero-probability dropout costs nothing.
    pub fn new(p: f32, seed: u64) -> Option<Self> {
        (p > 0.0).then_some(Self { p, seed, offset: 0 })
    }
    /// The same mask, read from element `offset` on.
    pub fn at(self, offset: u64) -> Self {
        Self { offset, ..self }
    }
    /// Multiplier for element `i`: 0 or 1/(1-p).
    #[inline(always)]
    pub fn factor(&self, i: usize) -> f32 {
        if rng::uniform(self.seed, self.offset + i as u64) < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

const CHUNK: usize = 16384;

/// `out = x + dropout(sub)`; x, sub, out: (N)
pub fn residual_add(out: &mut [f32], x: &[f32], sub: &[f32], drop: Option<Dropout>) {
    let _p = crate::profile::scope("residual add");
    let n = x.len();
    out[..n]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, o)| {
            let base = ci * CHUNK;
            let (xs, ss) = (&x[base..base + o.len()], &sub[base..base + o.len()]);
            match drop {
                None => o
                    .iter_mut()
                    .zip(xs)
                    .zip(ss)
                    .for_each(|((o, x), s)| *o = x + s),
                Some(d) => o
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, o)| *o = xs[i] + ss[i] * d.factor(base + i)),
            }
        });
}

/// In place `x = dropout(x)` (forward), or `dx = dropout'(dx)` (backward: same mask, same scale).
pub fn apply(x: &mut [f32], drop: Option<Dropout>) {
    if let Some(d) = drop {
        x.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, xs)| {
            let base = ci * CHUNK;
            xs.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v *= d.factor(base + i));
        });
    }
}

/// `out = dropout'(dy)` into a separate buffer (backward of the dropped branch of a residual).
pub fn backward_into(out: &mut [f32], dy: &[f32], drop: Option<Dropout>) {
    let _p = crate::profile::scope("residual grad copy");
    let n = dy.len();
    match drop {
        None => out[..n].copy_from_slice(dy),
        Some(d) => {
            out[..n]
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(ci, o)| {
                    let base = ci * CHUNK;
                    o.iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = dy[base + i] * d.factor(base + i));
                });
        }
    }
}
