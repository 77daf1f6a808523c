//! Token-budget batching with length buckets (fairseq's `--max-tokens`): examples of similar
//! length are grouped so that each padded batch holds about `max_tokens` tokens, and the batch
//! order is reshuffled every epoch from `(seed, epoch)`, so an epoch's batches can be rebuilt
//! exactly when training resumes.

use crate::rng::{hash, Rng};

/// Group example indices into batches whose padded size `rows × longest` stays within
/// `max_tokens` (a longer single example still forms its own batch).
/// `lengths[i]` is example i's padded cost (e.g. max of source and target length).
pub fn batches_by_tokens(
    lengths: &[usize],
    max_tokens: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(hash(seed, epoch));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    // Stable: examples of equal length keep the shuffled order, so buckets differ per epoch.
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = lengths[i].max(1);
        let new_longest = longest.max(len);
        if !cur.is_empty() && (cur.len() + 1) * new_longest > max_tokens {
            batches.push(std::mem::take(&mut cur));
            longest = len;
        } else {
            longest = new_longest;
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    shuffle(&mut batches, &mut rng);
    batches
}

/// Fisher–Yates with qkv's counter-based generator (so orders do not depend on a crate version).
fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Pad rows of ids to a (B, T) matrix.
fn pad_rows<'a>(
    rows: impl Iterator<Item = &'a [u32]> + Clone,
    pad: u32,
) -> (Vec<u32>, usize, usize) {
    let t = rows.clone().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut out = Vec::new();
    let mut b = 0;
    for r in rows {
        out.extend_from_slice(r);
        out.extend(std::iter::repeat_n(pad, t - r.len()));
        b += 1;
    }
    (out, b, t)
}

/// A batch split by rows, as data-parallel training hands each rank its share of every batch
/// ([`crate::dist`]). A share keeps the batch's padded lengths, so its dropout masks and
/// results are the whole batch's rows.
pub trait Rows: Sized {
    fn rows(&self) -> usize;
    /// Rows `r` as a batch of their own (`pad` fills the rows past their ends).
    fn select(&self, r: std::ops::Range<usize>, pad: u32) -> Self;
}

/// Rows `r` of a (B, len) row-major array.
fn rows_of<T: Copy>(x: &[T], len: usize, r: std::ops::Range<usize>) -> Vec<T> {
    x[r.start * len..r.end * len].to_vec()
}

/// A translation batch in fairseq's convention: `src = x + EOS`, `tgt_in = BOS + y`,
/// `tgt_out = y + EOS`. All (B, ·) row-major, padded with `pad`.
#[derive(Clone, Debug)]
pub struct Seq2SeqBatch {
    pub src: Vec<u32>,
    pub tgt_in: Vec<u32>,
    pub tgt_out: Vec<u32>,
    pub batch: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    /// Target tokens that count in the loss (not padding).
    pub n_tokens: usize,
}

impl Seq2SeqBatch {
    /// `pairs` hold raw ids without specials.
    pub fn new(pairs: &[(&[u32], &[u32])], pad: u32, bos: u32, eos: u32) -> Self {
        let src: Vec<Vec<u32>> = pairs.iter().map(|(s, _)| [*s, &[eos]].concat()).collect();
        let tin: Vec<Vec<u32>> = pairs.iter().map(|(_, t)| [&[bos], *t].concat()).collect();
        let tout: Vec<Vec<u32>> = pairs.iter().map(|(_, t)| [*t, &[eos]].concat()).collect();
        let (src, batch, src_len) = pad_rows(src.iter().map(|r| r.as_slice()), pad);
        let (tgt_in, _, tgt_len) = pad_rows(tin.iter().map(|r| r.as_slice()), pad);
        let (tgt_out, _, _) = pad_rows(tout.iter().map(|r| r.as_slice()), pad);
        Self {
            n_tokens: pairs.iter().map(|(_, t)| t.len() + 1).sum(),
            src,
            tgt_in,
            tgt_out,
            batch,
            src_len,
            tgt_len,
        }
    }
}

impl Rows for Seq2SeqBatch {
    fn rows(&self) -> usize {
        self.batch
    }
    fn select(&self, r: std::ops::Range<usize>, pad: u32) -> Self {
        let tgt_out = rows_of(&self.tgt_out, self.tgt_len, r.clone());
        Self {
            src: rows_of(&self.src, self.src_len, r.clone()),
            tgt_in: rows_of(&self.tgt_in, self.tgt_len, r.clone()),
            n_tokens: tgt_out.iter().filter(|&&t| t != pad).count(),
            tgt_out,
            batch: r.len(),
            src_len: self.src_len,
            tgt_len: self.tgt_len,
        }
    }
}

/// A classification batch: tokens (B, T) padded, one label per row.
#[derive(Clone, Debug)]
pub struct ClassifyBatch {
    pub tokens: Vec<u32>,
    pub labels: Vec<u32>,
    pub batch: usize,
    pub len: usize,
}

impl ClassifyBatch {
    pub fn new(examples: &[(&[u32], u32)], pad: u32) -> Self {
        let (tokens, batch, len) = pad_rows(examples.iter().map(|(t, _)| *t), pad);
        Self {
            tokens,
            labels: examples.iter().map(|(_, l)| *l).collect(),
            batch,
            len,
        }
    }
}

impl Rows for ClassifyBatch {
    fn rows(&self) -> usize {
        self.batch
    }
    fn select(&self, r: std::ops::Range<usize>, _pad: u32) -> Self {
        Self {
            tokens: rows_of(&self.tokens, self.len, r.clone()),
            labels: self.labels[r.clone()].to_vec(),
            batch: r.len(),
            len: self.len,
        }
    }
}

/// A language-modelling batch: `input` (B, T) and `target` (B, T) = input shifted by one.
#[derive(Clone, Debug)]
pub struct LmBatch {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
    pub batch: usize,
    pub len: usize,
}

impl LmBatch {
    /// Rows are blocks of `len + 1` contiguous tokens.
    pub fn new(blocks: &[&[u32]]) -> Self {
        let len = blocks
            .first()
            .map_or(1, |b| b.len().saturating_sub(1))
            .max(1);
        let mut input = Vec::with_capacity(blocks.len() * len);
        let mut target = Vec::with_capacity(blocks.len() * len);
        for b in blocks {
            input.extend_from_slice(&b[..len]);
            target.extend_from_slice(&b[1..=len]);
        }
        Self {
            input,
            target,
            batch: blocks.len(),
            len,
        }
    }
}

impl Rows for LmBatch {
    fn rows(&self) -> usize {
        self.batch
    }
    fn select(&self, r: std::ops::Range<usize>, _pad: u32) -> Self {
        Self {
            input: rows_of(&self.input, self.len, r.clone()),
            target: rows_of(&self.target, self.len, r.clone()),
            batch: r.len(),
            len: self.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_cover_all_and_change_per_epoch() {
        let lengths: Vec<usize> = (0..500).map(|i| 3 + (i * 37) % 60).collect();
        let a = batches_by_tokens(&lengths, 256, 7, 0);
        let b = batches_by_tokens(&lengths, 256, 7, 1);
        for batch in &a {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() * longest <= 256);
        }
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, batches_by_tokens(&lengths, 256, 7, 0));
    }

    #[test]
    fn seq2seq_batch_shifts_and_pads() {
        let b = Seq2SeqBatch::new(&[(&[5, 6], &[7]), (&[5], &[8, 9])], 0, 1, 2);
        assert_eq!((b.batch, b.src_len, b.tgt_len, b.n_tokens), (2, 3, 3, 5));
        assert_eq!(b.src, vec![5, 6, 2, 5, 2, 0]);
        assert_eq!(b.tgt_in, vec![1, 7, 0, 1, 8, 9]);
        assert_eq!(b.tgt_out, vec![7, 2, 0, 8, 9, 2]);
    }
}
