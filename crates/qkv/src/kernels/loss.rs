//! Cross-entropy with label smoothing (§5.4) and an ignored padding index, fused with the
//! softmax and with its own gradient: one pass over the logits produces loss and ∂L/∂logits.

use rayon::prelude::*;

/// Mean cross-entropy over the rows whose target is not `ignore`, with PyTorch's label
/// smoothing semantics: `(1-ε)·(−log p_y) + ε·mean_j(−log p_j)`.
/// logits, dlogits: (N, V); targets: (N). Returns (mean loss, number of counted rows).
/// `dlogits` receives ∂(mean loss)/∂logits (zero rows for ignored targets).
pub fn cross_entropy_forward_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    v: usize,
    ignore: Option<u32>,
    smoothing: f32,
) -> (f32, usize) {
    let _p = crate::profile::scope("cross-entropy");
    let n = targets.len();
    let count = targets.iter().filter(|&&t| Some(t) != ignore).count();
    if count == 0 {
        dlogits[..n * v].iter_mut().for_each(|x| *x = 0.0);
        return (0.0, 0);
    }
    let inv = 1.0 / count as f32;
    let eps_each = smoothing / v as f32;
    let total: f64 = dlogits[..n * v]
        .par_chunks_mut(v)
        .enumerate()
        .map(|(row, d)| {
            let y = targets[row];
            if Some(y) == ignore {
                d.iter_mut().for_each(|x| *x = 0.0);
                return 0.0f64;
            }
            let l = &logits[row * v..(row + 1) * v];
            let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            let mut sum_logit = 0.0f32;
            for i in 0..v {
                sum += (l[i] - max).exp();
                sum_logit += l[i];
            }
            let log_z = max + sum.ln();
            let inv_sum = 1.0 / sum;
            for i in 0..v {
                let p = (l[i] - max).exp() * inv_sum;
                d[i] = (p - eps_each) * inv;
            }
            d[y as usize] -= (1.0 - smoothing) * inv;
            let nll = log_z - l[y as usize];
            let smooth = log_z - sum_logit / v as f32;
            ((1.0 - smoothing) * nll + smoothing * smooth) as f64
        })
        .sum();
    ((total / count as f64) as f32, count)
}
