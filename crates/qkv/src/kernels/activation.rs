//! Bias + activation, fused into one pass after the matrix product (position-wise FFN, §3.3).

use super::bf16::bf16_bits;
use crate::parallel::{reduce_rows, rows_per_task, SendPtr};
use crate::simd::{self, multiversion};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// max(0, x), as in the paper (§3.3).
    Relu,
    /// Exact GELU, x·Φ(x) with the erf form (PyTorch's default, BERT's).
    Gelu,
    /// No activation: the bias-only case, used for plain linear layers.
    Identity,
}

const SQRT_1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

impl Activation {
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            // Not `x.max(0.0)`: that maps NaN to 0 and would hide a diverged model.
            // `x <= 0` is false for NaN, so NaN passes through; one compare + select.
            Activation::Relu => {
                if x <= 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Activation::Gelu => 0.5 * x * (1.0 + simd::erf(x * SQRT_1_2)),
            Activation::Identity => x,
        }
    }
    /// d act / dx at pre-activation `x`.
    #[inline(always)]
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => (x > 0.0) as u8 as f32,
            Activation::Gelu => {
                0.5 * (1.0 + simd::erf(x * SQRT_1_2)) + x * INV_SQRT_2PI * simd::exp(-0.5 * x * x)
            }
            Activation::Identity => 1.0,
        }
    }
}

/// In one pass: `pre += bias` (in place) and `post = act(pre)`.
/// pre, post: (N, F); bias: (F). With `Identity`, `post` may be empty and only the bias is added.
pub fn bias_act_forward(pre: &mut [f32], post: &mut [f32], bias: &[f32], act: Activation) {
    let _p = crate::profile::scope("bias+act forward");
    let f = bias.len();
    let n = pre.len() / f;
    let chunk = rows_per_task(n, f) * f;
    if act == Activation::Identity {
        pre.par_chunks_mut(chunk)
            .for_each(|p| add_bias_rows(p, bias));
        return;
    }
    pre.par_chunks_mut(chunk)
        .zip(post[..n * f].par_chunks_mut(chunk))
        .for_each(|(p, q)| match act {
            Activation::Relu => bias_relu_rows(p, q, bias),
            _ => bias_gelu_rows(p, q, bias),
        });
}

/// Backward of [`bias_act_forward`] in one pass, in place: `d` holds `dpost` on entry and
/// `dpre = dpost * act'(pre)` on exit, and `dbias += Σ_rows dpre`. In place because a separate
/// output would be one more (N, F) buffer for the caches to fetch before writing it.
/// For `Identity`, `d` is left as it is and only the bias gradient is formed.
pub fn bias_act_backward(d: &mut [f32], dbias: &mut [f32], pre: &[f32], act: Activation) {
    let _p = crate::profile::scope("act backward");
    let f = dbias.len();
    let n = d.len() / f;
    if act == Activation::Identity {
        column_sum(dbias, d, f);
        return;
    }
    assert!(pre.len() >= n * f);
    let out = SendPtr(d.as_mut_ptr());
    // The column sums are formed while the rows of dpre are still in registers, instead of
    // reading all of dpre (8 MB at N = 2048, F = 1024) again.
    reduce_rows(dbias, n, f, |start, len, sums| {
        // SAFETY: `reduce_rows` hands each call its own range of the n rows, and `d` holds
        // n rows of f (n = d.len() / f), borrowed uniquely for this function.
        let d = unsafe { std::slice::from_raw_parts_mut(out.get().add(start * f), len * f) };
        let pr = &pre[start * f..(start + len) * f];
        match act {
            Activation::Relu => relu_backward_rows(d, pr, sums),
            _ => gelu_backward_rows(d, pr, sums),
        }
    });
}

/// [`bias_act_forward`] for a bf16 consumer: `pre += bias` (in place) and `post = act(pre)`
/// rounded to bf16 as it is written, the only form the next product (bf16) reads. Half the
/// bytes of an f32 `post`, and no conversion pass before the product.
/// pre: (N, F); post: at least (N, F) bf16 bits; bias: (F). Not for `Identity`.
pub fn bias_act_forward_bf16(pre: &mut [f32], post: &mut [u16], bias: &[f32], act: Activation) {
    let _p = crate::profile::scope("bias+act forward");
    assert!(act != Activation::Identity, "no activation to write");
    let f = bias.len();
    let n = pre.len() / f;
    let chunk = rows_per_task(n, f) * f;
    pre.par_chunks_mut(chunk)
        .zip(post[..n * f].par_chunks_mut(chunk))
        .for_each(|(p, q)| match act {
            Activation::Relu => bias_relu_rows_bf16(p, q, bias),
            _ => bias_gelu_rows_bf16(p, q, bias),
        });
}

/// [`bias_act_backward`] for a bf16 consumer: `dpre = dpost * act'(pre)` is written rounded
/// to bf16 into `out` (`d`, the f32 `dpost`, is only read), and `dbias += Σ_rows dpre` sums
/// the unrounded values. d, pre: (N, F); out: at least (N, F). Not for `Identity`.
pub fn bias_act_backward_bf16(
    d: &[f32],
    dbias: &mut [f32],
    pre: &[f32],
    act: Activation,
    out: &mut [u16],
) {
    let _p = crate::profile::scope("act backward");
    assert!(
        act != Activation::Identity,
        "no activation to differentiate"
    );
    let f = dbias.len();
    let n = d.len() / f;
    assert!(pre.len() >= n * f && out.len() >= n * f);
    let dst = SendPtr(out.as_mut_ptr());
    reduce_rows(dbias, n, f, |start, len, sums| {
        // SAFETY: `reduce_rows` hands each call its own range of the n rows, and `out` holds
        // n rows of f (asserted), borrowed uniquely for this function.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(start * f), len * f) };
        let (dr, pr) = (
            &d[start * f..(start + len) * f],
            &pre[start * f..(start + len) * f],
        );
        match act {
            Activation::Relu => relu_backward_rows_bf16(dr, pr, sums, o),
            _ => gelu_backward_rows_bf16(dr, pr, sums, o),
        }
    });
}

/// `acc += Σ_rows x`, x: (N, F); acc: (F)
pub fn column_sum(acc: &mut [f32], x: &[f32], f: usize) {
    let _p = crate::profile::scope("bias grad (column sum)");
    let n = x.len() / f;
    reduce_rows(acc, n, f, |start, len, out| {
        add_rows(out, &x[start * f..(start + len) * f])
    });
}

multiversion! {
    /// `out += Σ rows` for rows of width `out.len()`.
    fn add_rows(out: &mut [f32], rows: &[f32]) {
        for row in rows.chunks_exact(out.len()) {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
    }
}

multiversion! {
    fn add_bias_rows(rows: &mut [f32], bias: &[f32]) {
        for row in rows.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
}

multiversion! {
    fn bias_relu_rows(pre: &mut [f32], post: &mut [f32], bias: &[f32]) {
        for (prow, qrow) in pre.chunks_exact_mut(bias.len()).zip(post.chunks_exact_mut(bias.len())) {
            for ((p, q), b) in prow.iter_mut().zip(qrow.iter_mut()).zip(bias) {
                let v = *p + b;
                *p = v;
                *q = if v <= 0.0 { 0.0 } else { v };
            }
        }
    }
}

multiversion! {
    fn bias_gelu_rows(pre: &mut [f32], post: &mut [f32], bias: &[f32]) {
        let f = bias.len();
        for (prow, qrow) in pre.chunks_exact_mut(f).zip(post.chunks_exact_mut(f)) {
            for ((p, q), b) in prow.iter_mut().zip(qrow.iter_mut()).zip(bias) {
                let v = *p + b;
                *p = v;
                *q = Activation::Gelu.apply(v);
            }
        }
    }
}

multiversion! {
    /// `d ← d · GELU'(pre)` row by row, adding each new row of `d` onto `sums`.
    fn gelu_backward_rows(d: &mut [f32], pre: &[f32], sums: &mut [f32]) {
        let f = sums.len();
        for (dr, xr) in d.chunks_exact_mut(f).zip(pre.chunks_exact(f)) {
            for ((v, x), s) in dr.iter_mut().zip(xr).zip(sums.iter_mut()) {
                *v *= Activation::Gelu.derivative(*x);
                *s += *v;
            }
        }
    }
}

multiversion! {
    /// `d ← d · [pre > 0]` row by row, adding each new row of `d` onto `sums`.
    fn relu_backward_rows(d: &mut [f32], pre: &[f32], sums: &mut [f32]) {
        let f = sums.len();
        for (dr, xr) in d.chunks_exact_mut(f).zip(pre.chunks_exact(f)) {
            for ((v, x), s) in dr.iter_mut().zip(xr).zip(sums.iter_mut()) {
                *v = if *x > 0.0 { *v } else { 0.0 };
                *s += *v;
            }
        }
    }
}

multiversion! {
    fn bias_relu_rows_bf16(pre: &mut [f32], post: &mut [u16], bias: &[f32]) {
        for (prow, qrow) in pre.chunks_exact_mut(bias.len()).zip(post.chunks_exact_mut(bias.len())) {
            for ((p, q), b) in prow.iter_mut().zip(qrow.iter_mut()).zip(bias) {
                let v = *p + b;
                *p = v;
                *q = bf16_bits(if v <= 0.0 { 0.0 } else { v }) as u16;
            }
        }
    }
}

multiversion! {
    fn bias_gelu_rows_bf16(pre: &mut [f32], post: &mut [u16], bias: &[f32]) {
        let f = bias.len();
        for (prow, qrow) in pre.chunks_exact_mut(f).zip(post.chunks_exact_mut(f)) {
            for ((p, q), b) in prow.iter_mut().zip(qrow.iter_mut()).zip(bias) {
                let v = *p + b;
                *p = v;
                *q = bf16_bits(Activation::Gelu.apply(v)) as u16;
            }
        }
    }
}

multiversion! {
    /// `out ← bf16(d · [pre > 0])` row by row, adding each row (unrounded) onto `sums`.
    fn relu_backward_rows_bf16(d: &[f32], pre: &[f32], sums: &mut [f32], out: &mut [u16]) {
        let f = sums.len();
        for ((dr, xr), or) in d.chunks_exact(f).zip(pre.chunks_exact(f)).zip(out.chunks_exact_mut(f)) {
            for (((v, x), s), o) in dr.iter().zip(xr).zip(sums.iter_mut()).zip(or.iter_mut()) {
                let g = if *x > 0.0 { *v } else { 0.0 };
                *s += g;
                *o = bf16_bits(g) as u16;
            }
        }
    }
}

multiversion! {
    /// `out ← bf16(d · GELU'(pre))` row by row, adding each row (unrounded) onto `sums`.
    fn gelu_backward_rows_bf16(d: &[f32], pre: &[f32], sums: &mut [f32], out: &mut [u16]) {
        let f = sums.len();
        for ((dr, xr), or) in d.chunks_exact(f).zip(pre.chunks_exact(f)).zip(out.chunks_exact_mut(f)) {
            for (((v, x), s), o) in dr.iter().zip(xr).zip(sums.iter_mut()).zip(or.iter_mut()) {
                let g = *v * Activation::Gelu.derivative(*x);
                *s += g;
                *o = bf16_bits(g) as u16;
            }
        }
    }
}
