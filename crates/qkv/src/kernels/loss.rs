//! Cross-entropy with label smoothing (§5.4) and an ignored padding index, fused with the
//! softmax and with its own gradient: one pass over the logits produces loss and ∂L/∂logits.

use rayon::prelude::*;

use crate::simd::{self, multiversion};

multiversion! {
    /// (log Σ exp, Σ logits) of one row of logits.
    fn row_stats(l: &[f32]) -> (f32, f32) {
        let max = simd::max(l);
        (max + simd::sum_exp(l, max).ln(), simd::sum(l))
    }
}

multiversion! {
    /// `d ← (softmax(l) − ε/V) · inv` (the smoothed target's uniform part; the caller subtracts
    /// its one-hot part) and the row's stats as [`row_stats`]. The exponentials are written
    /// once and rescaled in place: libm's scalar `exp`, twice per logit, made this the
    /// seq2seq step's largest kernel after the products (57 ms of 455 on Zen3, V = 8000).
    fn softmax_grad_row(d: &mut [f32], l: &[f32], eps_each: f32, inv: f32) -> (f32, f32) {
        let max = simd::max(l);
        let mut acc = [0.0f32; 16];
        let (mut dc, mut lc) = (d.chunks_exact_mut(16), l.chunks_exact(16));
        for (dv, lv) in (&mut dc).zip(&mut lc) {
            for j in 0..16 {
                dv[j] = simd::exp(lv[j] - max);
                acc[j] += dv[j];
            }
        }
        let mut rest = 0.0f32;
        for (dv, &x) in dc.into_remainder().iter_mut().zip(lc.remainder()) {
            *dv = simd::exp(x - max);
            rest += *dv;
        }
        // Summed in `simd::sum_exp`'s order, so evaluation's loss equals training's bit for bit.
        let sum = acc.iter().sum::<f32>() + rest;
        let scale = inv / sum;
        let shift = eps_each * inv;
        for dv in d.iter_mut() {
            *dv = *dv * scale - shift;
        }
        (max + sum.ln(), simd::sum(l))
    }
}

/// What one cross-entropy pass measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    /// The objective, mean over counted rows: `(1-ε)·NLL + ε·mean_j(−log p_j)`.
    pub mean: f32,
    /// Σ −log p(target) over counted rows, without smoothing (perplexity, validation).
    pub nll_sum: f64,
    /// Rows whose target is not ignored.
    pub count: usize,
}

/// Cross-entropy over the rows whose target is not `ignore`, with PyTorch's label smoothing
/// semantics: `(1-ε)·(−log p_y) + ε·mean_j(−log p_j)`. logits, dlogits: (N, V); targets: (N).
/// With `dlogits`, it receives ∂(mean loss)/∂logits in the same pass (zero rows for ignored
/// targets); without, only the loss is computed (evaluation).
pub fn cross_entropy(
    dlogits: Option<&mut [f32]>,
    logits: &[f32],
    targets: &[u32],
    v: usize,
    ignore: Option<u32>,
    smoothing: f32,
) -> CrossEntropy {
    let _p = crate::profile::scope("cross-entropy");
    let n = targets.len();
    let count = targets.iter().filter(|&&t| Some(t) != ignore).count();
    let inv = 1.0 / count.max(1) as f32;
    let eps_each = smoothing / v as f32;
    // (objective, NLL) of one row; writes its gradient when asked.
    let row = |row: usize, d: Option<&mut [f32]>| -> (f64, f64) {
        let y = targets[row];
        if Some(y) == ignore {
            if let Some(d) = d {
                d.iter_mut().for_each(|x| *x = 0.0);
            }
            return (0.0, 0.0);
        }
        let l = &logits[row * v..(row + 1) * v];
        let (log_z, sum_logit) = match d {
            Some(d) => {
                let stats = softmax_grad_row(d, l, eps_each, inv);
                d[y as usize] -= (1.0 - smoothing) * inv;
                stats
            }
            None => row_stats(l),
        };
        let nll = log_z - l[y as usize];
        let smooth = log_z - sum_logit / v as f32;
        (
            ((1.0 - smoothing) * nll + smoothing * smooth) as f64,
            nll as f64,
        )
    };
    let add = |a: (f64, f64), b: (f64, f64)| (a.0 + b.0, a.1 + b.1);
    let (total, nll_sum) = match dlogits {
        Some(d) => d[..n * v]
            .par_chunks_mut(v)
            .enumerate()
            .map(|(r, d)| row(r, Some(d)))
            .reduce(|| (0.0, 0.0), add),
        None => (0..n)
            .into_par_iter()
            .map(|r| row(r, None))
            .reduce(|| (0.0, 0.0), add),
    };
    CrossEntropy {
        mean: if count == 0 {
            0.0
        } else {
            (total / count as f64) as f32
        },
        nll_sum,
        count,
    }
}
