//! Layer normalisation (Ba et al., 2016), and the residual connection around it ("Add & Norm",
//! Figure 1): the residual sum (with the sublayer's dropout) is formed in one pass and
//! normalised in a second, and backward adds the normalisation's input gradient onto the
//! residual branch's instead of writing it to a separate buffer.

use crate::kernels::dropout::{self, Dropout};
use crate::kernels::Acc;
use crate::parallel::{reduce_rows, rows_per_task};
use crate::simd::{self, multiversion};
use rayon::prelude::*;

/// `out = LN(x) * w + b` over rows of width `c`; saves per-row `mean` and `rstd` for backward.
/// x, out: (N, C); mean, rstd: (N)
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
    eps: f32,
) {
    let _p = crate::profile::scope("layernorm forward");
    let n = x.len() / c;
    let chunk = rows_per_task(n, c);
    out[..n * c]
        .par_chunks_mut(chunk * c)
        .zip(mean[..n].par_chunks_mut(chunk))
        .zip(rstd[..n].par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(ci, ((o, mu), rs))| {
            let r0 = ci * chunk;
            for (r, orow) in o.chunks_mut(c).enumerate() {
                let xr = &x[(r0 + r) * c..(r0 + r + 1) * c];
                let (m, s) = normalise_row(orow, xr, w, b, eps);
                mu[r] = m;
                rs[r] = s;
            }
        });
}

/// Post-LN "Add & Norm": `sum = x + dropout(sub)`, then `out = LN(sum)`, two passes. `sum` is
/// saved for backward. x, sub, sum, out: (N, C)
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_forward(
    sum: &mut [f32],
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    sub: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
    eps: f32,
    drop: Option<Dropout>,
) {
    dropout::residual_add(sum, x, sub, drop);
    layernorm_forward(out, mean, rstd, sum, w, b, c, eps);
}

/// Backward of [`layernorm_forward`]: `dx (+)= ∂L/∂x`, `dw += …`, `db += …`.
/// With [`Acc::Add`] the input gradient is added onto `dx`: how the residual branch's gradient
/// is fused in without a separate pass.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    w: &[f32],
    c: usize,
    dx_acc: Acc,
) {
    let _p = crate::profile::scope("layernorm backward");
    let accumulate_dx = dx_acc.adds();
    let n = x.len() / c;
    let chunk = rows_per_task(n, c);
    dx[..n * c]
        .par_chunks_mut(chunk * c)
        .enumerate()
        .for_each(|(ci, dxc)| {
            let r0 = ci * chunk;
            for (r, dxr) in dxc.chunks_mut(c).enumerate() {
                let row = r0 + r;
                let (xr, dyr) = (&x[row * c..(row + 1) * c], &dy[row * c..(row + 1) * c]);
                backward_row(dxr, dyr, xr, w, mean[row], rstd[row], accumulate_dx);
            }
        });
    layernorm_param_grads(dw, db, dy, x, mean, rstd, c);
}

/// `dw += Σ_rows dy * xhat`, `db += Σ_rows dy`.
pub fn layernorm_param_grads(
    dw: &mut [f32],
    db: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let _p = crate::profile::scope("layernorm param grads");
    let n = x.len() / c;
    let mut acc = vec![0.0f32; 2 * c];
    reduce_rows(&mut acc, n, c, |start, len, out| {
        let (ow, ob) = out.split_at_mut(c);
        let rows = start * c..(start + len) * c;
        param_grad_rows(
            ow,
            ob,
            &dy[rows.clone()],
            &x[rows],
            &mean[start..start + len],
            &rstd[start..start + len],
        );
    });
    dw.iter_mut().zip(&acc[..c]).for_each(|(a, b)| *a += b);
    db.iter_mut().zip(&acc[c..]).for_each(|(a, b)| *a += b);
}

multiversion! {
    fn normalise_row(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) -> (f32, f32) {
        let c = x.len() as f32;
        let m = simd::sum(x) / c;
        let mut acc = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let rest: f32 = chunks.remainder().iter().map(|v| (v - m) * (v - m)).sum();
        for ch in chunks {
            for l in 0..16 {
                acc[l] += (ch[l] - m) * (ch[l] - m);
            }
        }
        let var = (acc.iter().sum::<f32>() + rest) / c;
        let s = 1.0 / (var + eps).sqrt();
        for (((o, xv), wv), bv) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (xv - m) * s * wv + bv;
        }
        (m, s)
    }
}

multiversion! {
    /// One row of LayerNorm backward: `dx (+)= s · (dy∘w − mean(dy∘w) − x̂ · mean(dy∘w∘x̂))`.
    fn backward_row(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], m: f32, s: f32, accumulate: bool) {
        let c = x.len();
        let mut acc_d = [0.0f32; 16];
        let mut acc_dx = [0.0f32; 16];
        let mut i = 0;
        while i + 16 <= c {
            for l in 0..16 {
                let xhat = (x[i + l] - m) * s;
                let d = dy[i + l] * w[i + l];
                acc_d[l] += d;
                acc_dx[l] += d * xhat;
            }
            i += 16;
        }
        let (mut sum_d, mut sum_dx) = (acc_d.iter().sum::<f32>(), acc_dx.iter().sum::<f32>());
        for j in i..c {
            let xhat = (x[j] - m) * s;
            let d = dy[j] * w[j];
            sum_d += d;
            sum_dx += d * xhat;
        }
        let (mean_d, mean_dx) = (sum_d / c as f32, sum_dx / c as f32);
        for j in 0..c {
            let xhat = (x[j] - m) * s;
            let g = s * (dy[j] * w[j] - mean_d - xhat * mean_dx);
            dx[j] = if accumulate { dx[j] + g } else { g };
        }
    }
}

multiversion! {
    /// `dw += Σ dy∘x̂`, `db += Σ dy` over rows of width `dw.len()`.
    fn param_grad_rows(dw: &mut [f32], db: &mut [f32], dy: &[f32], x: &[f32], mean: &[f32], rstd: &[f32]) {
        let c = dw.len();
        for (r, (xr, dyr)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).enumerate() {
            let (m, s) = (mean[r], rstd[r]);
            for i in 0..c {
                dw[i] += dyr[i] * (xr[i] - m) * s;
                db[i] += dyr[i];
            }
        }
    }
}
