//! Token embeddings and positional encodings (§3.4, §3.5).

use crate::kernels::dropout::{self, Dropout};
use rayon::prelude::*;

/// The fixed sinusoidal table of §3.5: PE(t, 2i) = sin(t / 10000^(2i/C)), PE(t, 2i+1) = cos(…).
/// Returns (max_len, C).
pub fn sinusoidal_table(max_len: usize, c: usize) -> Vec<f32> {
    let mut pe = vec![0.0f32; max_len * c];
    for t in 0..max_len {
        for i in 0..c {
            let pair = (i / 2) * 2;
            let angle = t as f64 / 10000f64.powf(pair as f64 / c as f64);
            pe[t * c + i] = if i % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    pe
}

/// `out[b, t] = dropout(table[tokens[b, t]] · scale + pos[t])`.
/// tokens: (B, T) already validated against the vocabulary; table: (V, C); pos: (≥T, C); out: (B, T, C)
#[allow(clippy::too_many_arguments)] // the CUDA twin's arguments, one for one
pub fn embedding_forward(
    out: &mut [f32],
    tokens: &[u32],
    table: &[f32],
    pos: &[f32],
    scale: f32,
    t_len: usize,
    c: usize,
    drop: Option<Dropout>,
) {
    let _p = crate::profile::scope("embedding forward");
    out[..tokens.len() * c]
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(row, o)| {
            let tok = tokens[row] as usize;
            let e = &table[tok * c..(tok + 1) * c];
            let p = &pos[(row % t_len) * c..(row % t_len + 1) * c];
            for i in 0..c {
                o[i] = e[i] * scale + p[i];
            }
        });
    dropout::apply(&mut out[..tokens.len() * c], drop);
}

/// Backward: `dtable[tokens[b, t]] += dout[b, t] · scale` and, for learned positions,
/// `dpos[t] += Σ_b dout[b, t]`. `dout` must already have the dropout mask applied.
/// Split over column ranges so that rows repeated in `tokens` never race.
pub fn embedding_backward(
    dtable: &mut [f32],
    dpos: Option<&mut [f32]>,
    dout: &[f32],
    tokens: &[u32],
    scale: f32,
    t_len: usize,
    c: usize,
) {
    let _p = crate::profile::scope("embedding backward");
    let threads = rayon::current_num_threads().max(1);
    let width = c.div_ceil(threads).max(16).min(c);
    let cols: Vec<usize> = (0..c).step_by(width).collect();
    let table = crate::parallel::SendPtr(dtable.as_mut_ptr());
    let tlen = dtable.len();
    cols.par_iter().for_each(|&c0| {
        let c1 = (c0 + width).min(c);
        for (row, &tok) in tokens.iter().enumerate() {
            let base = tok as usize * c;
            assert!(base + c <= tlen);
            for i in c0..c1 {
                // SAFETY: each task owns the column range [c0, c1) of every row; bounds asserted.
                unsafe { *table.get().add(base + i) += dout[row * c + i] * scale };
            }
        }
    });
    if let Some(dp) = dpos {
        for (row, d) in dout[..tokens.len() * c].chunks(c).enumerate() {
            let t = row % t_len;
            dp[t * c..(t + 1) * c]
                .iter_mut()
                .zip(d)
                .for_each(|(a, b)| *a += b);
        }
    }
}
