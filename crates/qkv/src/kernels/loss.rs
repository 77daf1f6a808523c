//! Cross-entropy with label smoothing (§5.4) and an ignored padding index, fused with the
//! softmax and with its own gradient: one pass over the logits produces loss and ∂L/∂logits.

use rayon::prelude::*;

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
        let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0f32;
        let mut sum_logit = 0.0f32;
        for &x in l {
            sum += (x - max).exp();
            sum_logit += x;
        }
        let log_z = max + sum.ln();
        if let Some(d) = d {
            let inv_sum = 1.0 / sum;
            for (d, &x) in d.iter_mut().zip(l) {
                *d = ((x - max).exp() * inv_sum - eps_each) * inv;
            }
            d[y as usize] -= (1.0 - smoothing) * inv;
        }
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
