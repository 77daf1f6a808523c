//! Row softmax with masking, and its backward. Used by attention (Eq. 1).

use crate::simd::{self, multiversion};

multiversion! {
    /// In place softmax over `row[..valid]` where `padding[j]` (if given) removes key j; entries
    /// from `valid` on (causal: keys after the query) become 0. A fully masked row becomes all
    /// zeros (PyTorch gives NaN there; zeros keep padded queries harmless).
    pub fn softmax_row(row: &mut [f32], valid: usize, padding: Option<&[bool]>) {
        let (live, dead) = row.split_at_mut(valid.min(row.len()));
        dead.iter_mut().for_each(|v| *v = 0.0);
        if let Some(pad) = padding {
            for (v, &m) in live.iter_mut().zip(pad) {
                *v = if m { f32::NEG_INFINITY } else { *v };
            }
        }
        let max = simd::max(live);
        if max == f32::NEG_INFINITY {
            live.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        for v in live.iter_mut() {
            let e = simd::exp(*v - max);
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { e };
        }
        let inv = 1.0 / simd::sum(live);
        live.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// Backward through softmax for one row, in place: `d ← p ∘ (d − Σ_j d_j p_j) · scale`.
    pub fn softmax_row_backward(d: &mut [f32], p: &[f32], scale: f32) {
        let dot = simd::dot(d, p);
        d.iter_mut().zip(p).for_each(|(dv, pv)| *dv = pv * (*dv - dot) * scale);
    }
}

/// Softmax over each row of width `n`: x: (R, N) in place.
pub fn softmax_forward(x: &mut [f32], n: usize) {
    for row in x.chunks_mut(n) {
        softmax_row(row, n, None);
    }
}

/// Backward over rows of width `n`: `d` holds ∂L/∂p on entry and ∂L/∂x on exit; p: (R, N).
pub fn softmax_backward(d: &mut [f32], p: &[f32], n: usize) {
    for (dr, pr) in d.chunks_mut(n).zip(p.chunks(n)) {
        softmax_row_backward(dr, pr, 1.0);
    }
}
