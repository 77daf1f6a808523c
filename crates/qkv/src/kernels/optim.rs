//! Fused optimizer passes over flat buffers: AdamW (Loshchilov & Hutter, 2019) and the
//! global gradient norm used for clipping.

use crate::simd::multiversion;
use rayon::prelude::*;

const CHUNK: usize = 16384;

/// One AdamW update in a single pass over (param, grad, m, v), matching `torch.optim.AdamW`:
/// decoupled decay `p -= lr·wd·p`, then `p -= lr/(1-β1^t) · m / (√v/√(1-β2^t) + ε)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step: u64,
) {
    let _p = crate::profile::scope("adamw");
    let bc1 = 1.0 - (beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (beta2 as f64).powi(step as i32);
    let step_size = (lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - lr * weight_decay;
    params
        .par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(ci, ((p, m), v))| {
            let g = &grads[ci * CHUNK..ci * CHUNK + p.len()];
            adamw_chunk(
                p,
                g,
                m,
                v,
                step_size,
                inv_sqrt_bc2,
                decay,
                beta1,
                beta2,
                eps,
            );
        });
}

multiversion! {
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step_size: f32, inv_sqrt_bc2: f32, decay: f32, beta1: f32, beta2: f32, eps: f32) {
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        for i in 0..n {
            m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
            v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
            let denom = v[i].sqrt() * inv_sqrt_bc2 + eps;
            p[i] = p[i] * decay - step_size * m[i] / denom;
        }
    }
}

multiversion! {
    fn sum_squares_chunk(x: &[f32]) -> f64 {
        // f32 lanes within a chunk, f64 across chunks.
        let mut acc = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for l in 0..16 {
                acc[l] += c[l] * c[l];
            }
        }
        acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64
    }
}

/// Sum of squares in f64 (so the norm of millions of parameters stays exact enough).
pub fn sum_squares(x: &[f32]) -> f64 {
    let _p = crate::profile::scope("grad norm");
    x.par_chunks(CHUNK).map(sum_squares_chunk).sum()
}

/// Multiply in place.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}
