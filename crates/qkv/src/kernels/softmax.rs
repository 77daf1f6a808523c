//! Row softmax with optional masking, and its backward. Used by attention (Eq. 1).

/// In place softmax over `row`, treating entries where `masked(j)` as −∞.
/// A fully masked row becomes all zeros (PyTorch gives NaN there; zeros keep padded
/// queries harmless and their gradients zero).
#[inline]
pub fn softmax_row_masked(row: &mut [f32], masked: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, v) in row.iter().enumerate() {
        if !masked(j) && *v > max {
            max = *v;
        }
    }
    if max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0.0f32;
    for (j, v) in row.iter_mut().enumerate() {
        let e = if masked(j) { 0.0 } else { (*v - max).exp() };
        *v = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Softmax over each row of width `n`: x: (R, N) in place.
pub fn softmax_forward(x: &mut [f32], n: usize) {
    for row in x.chunks_mut(n) {
        softmax_row_masked(row, |_| false);
    }
}

/// Backward through softmax for one row, in place: `d ← p ∘ (d − Σ_j d_j p_j) · scale`.
#[inline]
pub fn softmax_row_backward(d: &mut [f32], p: &[f32], scale: f32) {
    let dot: f32 = d.iter().zip(p).map(|(a, b)| a * b).sum();
    d.iter_mut()
        .zip(p)
        .for_each(|(dv, pv)| *dv = pv * (*dv - dot) * scale);
}

/// Backward over rows of width `n`: `d` holds ∂L/∂p on entry and ∂L/∂x on exit; p: (R, N).
pub fn softmax_backward(d: &mut [f32], p: &[f32], n: usize) {
    for (dr, pr) in d.chunks_mut(n).zip(p.chunks(n)) {
        softmax_row_backward(dr, pr, 1.0);
    }
}
