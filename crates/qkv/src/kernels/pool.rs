//! Pooling a sequence's states into one vector per row (the classifier's input, and
//! sentence-transformers' embeddings): the first position, or the mean over real positions.

/// Which positions a row's vector summarises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The first position (a [CLS]-style token).
    First,
    /// The mean over non-padding positions (a row of padding alone counts as one position).
    Mean,
}

/// Positions of row `b` that are not padding, at least 1 to keep the mean defined.
pub fn real_positions(pad: &[bool], b: usize, t: usize) -> usize {
    pad[b * t..(b + 1) * t]
        .iter()
        .filter(|&&m| !m)
        .count()
        .max(1)
}

/// out (B, C) from h (B, T, C) and the padding (B, T).
pub fn pool_forward(out: &mut [f32], h: &[f32], pad: &[bool], t: usize, c: usize, pool: Pool) {
    for (row, out) in out.chunks_mut(c).enumerate() {
        out.iter_mut().for_each(|v| *v = 0.0);
        match pool {
            Pool::First => out.copy_from_slice(&h[row * t * c..row * t * c + c]),
            Pool::Mean => {
                let inv = 1.0 / real_positions(pad, row, t) as f32;
                for pos in (0..t).filter(|&pos| !pad[row * t + pos]) {
                    let hr = &h[(row * t + pos) * c..(row * t + pos + 1) * c];
                    out.iter_mut().zip(hr).for_each(|(o, v)| *o += v * inv);
                }
            }
        }
    }
}

/// dh (B, T, C), overwritten, from dpooled (B, C): what [`pool_forward`] read gets its share.
pub fn pool_backward(
    dh: &mut [f32],
    dpooled: &[f32],
    pad: &[bool],
    t: usize,
    c: usize,
    pool: Pool,
) {
    let b = dpooled.len() / c;
    dh[..b * t * c].iter_mut().for_each(|v| *v = 0.0);
    for (row, dp) in dpooled.chunks(c).enumerate() {
        match pool {
            Pool::First => dh[row * t * c..row * t * c + c].copy_from_slice(dp),
            Pool::Mean => {
                let inv = 1.0 / real_positions(pad, row, t) as f32;
                for pos in (0..t).filter(|&pos| !pad[row * t + pos]) {
                    let d = &mut dh[(row * t + pos) * c..(row * t + pos + 1) * c];
                    d.iter_mut().zip(dp).for_each(|(o, v)| *o = v * inv);
                }
            }
        }
    }
}
