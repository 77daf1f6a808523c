//! Data-parallel training: K processes (ranks), each with the whole model, train as one.
//!
//! Every rank builds the same batches in the same order as one process would, and takes its
//! share of each batch's rows, cut so the shares hold about the same number of loss targets
//! ([`share`]). Each rank's backward adds `its targets / the update's targets` of the mean-loss
//! gradient, so the element-wise sum of the ranks' gradients is the gradient one process
//! would have computed; the ranks sum it in buckets, each started as soon as the backward has
//! finished it ([`crate::model::Model::backward_with`], [`Collective::start_sum`]), and the
//! optimizer then takes the same step everywhere. Dropout masks are indexed by the whole batch's
//! elements ([`crate::model::Mode::rows_of`]), so a split draws the same masks.
//!
//! What varies between ranks, the clock and Ctrl-C, is decided once by rank 0 and broadcast
//! ([`Collective::broadcast_f64`]): every rank stops, validates and fits its time budget at the
//! same update. Rank 0 alone writes the run directory; the others receive its prepared files
//! and, when resuming, its checkpoint.
//!
//! The transport is MPI ([`mpi`], cargo feature `mpi`, launched by `mpirun`); [`Solo`] is one
//! process, and costs nothing.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::Result;
use std::ops::Range;

/// The operations data-parallel training needs from its transport. Every rank calls the same
/// operations in the same order; `what` names the operation in errors (a rank that never
/// arrives is named with it).
pub trait Collective {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` ← the element-wise sum of every rank's `buf`.
    fn sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()>;
    /// Start summing a bucket of gradients, `data`, which [`Collective::finish_sums`] writes
    /// at `offset` of its buffer. Buckets are summed while the caller goes on (a backward
    /// computing the next ones); every rank starts the same buckets in the same order.
    fn start_sum(&self, offset: usize, data: &[f32], what: &str) -> Result<()>;
    /// Let the started sums advance (MPI moves non-blocking operations only inside its calls).
    fn progress(&self) -> Result<()>;
    /// Wait for every started sum and write each into `out` at its offset.
    fn finish_sums(&self, out: &mut [f32], what: &str) -> Result<()>;
    /// `buf` ← rank 0's `buf` (same length on every rank).
    fn broadcast_f32(&self, buf: &mut [f32], what: &str) -> Result<()>;
    fn broadcast_f64(&self, buf: &mut [f64], what: &str) -> Result<()>;
    /// `bytes` ← rank 0's bytes (any length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, what: &str) -> Result<()>;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn start_sum(&self, _: usize, _: &[f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn progress(&self) -> Result<()> {
        Ok(())
    }
    /// The sum over one rank is the data itself, which the caller already holds in `out`.
    fn finish_sums(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: &str) -> Result<()> {
        Ok(())
    }
}

/// Rank `rank`'s rows of a batch whose rows carry `weights` (loss targets per row): contiguous
/// shares cut where the running total passes `k / size` of the whole, so each share holds
/// about the same number of targets. A share may be empty (fewer rows than ranks).
pub fn share(weights: &[usize], rank: usize, size: usize) -> Range<usize> {
    let total: usize = weights.iter().sum();
    // The first row whose running total (inclusive) reaches the k-th cut.
    let cut = |k: usize| -> usize {
        if k == 0 {
            return 0;
        }
        if k >= size {
            return weights.len();
        }
        let target = (total * k).div_ceil(size);
        let mut run = 0;
        for (i, w) in weights.iter().enumerate() {
            if run >= target {
                return i;
            }
            run += w;
        }
        weights.len()
    };
    cut(rank)..cut(rank + 1)
}

/// Rank `rank`'s items of `n` (validation work): contiguous, sizes differing by at most one.
pub fn part(n: usize, rank: usize, size: usize) -> Range<usize> {
    let at = |k: usize| n * k / size;
    at(rank)..at(rank + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_row_once_and_balance_targets() {
        let weights: Vec<usize> = (0..37).map(|i| 3 + (i * 7) % 11).collect();
        let total: usize = weights.iter().sum();
        for size in 1..=5 {
            let mut next = 0;
            for rank in 0..size {
                let r = share(&weights, rank, size);
                assert_eq!(r.start, next, "size {size} rank {rank}");
                next = r.end;
                let got: usize = weights[r].iter().sum();
                // Within one row's weight (at most 13) of an even share.
                assert!(
                    got.abs_diff(total / size) <= 13,
                    "{size}/{rank}: {got} of {total}"
                );
            }
            assert_eq!(next, weights.len());
        }
        assert_eq!(share(&[5], 1, 2), 1..1);
        assert_eq!(share(&[5], 0, 2), 0..1);
    }

    #[test]
    fn parts_split_evenly() {
        assert_eq!(part(10, 0, 3), 0..3);
        assert_eq!(part(10, 1, 3), 3..6);
        assert_eq!(part(10, 2, 3), 6..10);
        assert_eq!(part(1, 1, 2), 0..1);
    }
}
