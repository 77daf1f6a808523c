//! Ensembles of Seq2Seq models (fairseq's `--path a.pt:b.pt`, OpenNMT's `-model a.pt b.pt`):
//! every model reads the source and the tokens chosen so far, and each next token comes from
//! the average of their distributions, `log((1/n) Σᵢ softmax(zᵢ))`, as fairseq's
//! `EnsembleModel` averages probabilities. Runs with other seeds (or checkpoints of one run)
//! can decode better together than alone when each has learned a little differently.
//!
//! Two differences from fairseq: sampling's temperature T divides the averaged
//! log-probabilities (drawing from p̄^(1/T), renormalized), where fairseq divides each model's
//! logits before averaging; the two agree at T = 1. And probabilities below ~1e-38 (e^-87, where
//! [`crate::simd::exp`] stops) count as that floor, so the far tail of the vocabulary ties there
//! (log-probability ≈ −87 − ln Σ); no decoding rule reaches so far down.
//!
//! The models' caches travel together: the first model's [`KvCache`] holds the others' in
//! `members`, and its `reorder` and `absorb` apply to them, so beam search and continuous
//! batching need not know there is more than one model.

use super::kv_cache::{Decoding, Incremental, KvCache};
use super::{Model, Seq2Seq, Tokens};
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::kernels::packed::SharedPacks;
use std::sync::Arc;

/// What the translation pipeline ([`crate::tasks::translate`]) decodes with on backend `B`:
/// one [`Seq2Seq`] or (on the CPU) an [`Ensemble`] of them.
pub trait EncoderDecoder<B: Decoding = Cpu>: Incremental<B> + Clone + Send {
    /// Longest sequence (source, or output with BOS) the model reads.
    fn max_len(&self) -> usize;
    /// Encode a batch of sources and start a cache of `max_len` output positions (at most).
    fn start_decoding(&mut self, src: Tokens, max_len: usize) -> Result<KvCache<B>>;
    /// Take `other`'s parameter values (a decoding copy refreshed for a call).
    fn refresh_from(&mut self, other: &Self);
    /// Parameter vectors (models): each gets its own [`SharedPacks`] in [`Self::share_packs`].
    fn parameter_sets(&self) -> usize;
    /// Packed decoder weights shared with the other copies decoding the same call, one set per
    /// model; none (empty) ends the sharing.
    fn share_packs(&mut self, packs: Vec<Arc<SharedPacks>>);
}

impl<B: Decoding> EncoderDecoder<B> for Seq2Seq<B>
where
    Seq2Seq<B>: Send,
{
    fn max_len(&self) -> usize {
        self.config.max_len
    }
    fn start_decoding(&mut self, src: Tokens, max_len: usize) -> Result<KvCache<B>> {
        Seq2Seq::start_decoding(self, src, max_len)
    }
    fn refresh_from(&mut self, other: &Self) {
        if self.config == other.config {
            let (be, n) = (self.backend().clone(), self.params.len());
            be.copy(
                be.grow(&mut self.params.data, n),
                B::view(&other.params.data, n),
            );
        } else {
            *self = other.clone();
        }
    }
    fn parameter_sets(&self) -> usize {
        1
    }
    fn share_packs(&mut self, packs: Vec<Arc<SharedPacks>>) {
        self.shared_packs = packs.into_iter().next();
    }
}

#[derive(Clone)]
pub struct Ensemble {
    pub models: Vec<Seq2Seq>,
    /// (R, V): the step's averaged log-probabilities.
    log_probs: Vec<f32>,
}

impl Ensemble {
    /// Models that share a target vocabulary (the caller checks that their tokenizers agree).
    pub fn new(models: Vec<Seq2Seq>) -> Result<Self> {
        let Some(first) = models.first() else {
            return Err(Error::Usage("an ensemble needs at least one model".into()));
        };
        let v = first.config.tgt_vocab();
        if let Some((i, m)) = (models.iter().enumerate()).find(|(_, m)| m.config.tgt_vocab() != v) {
            return Err(Error::Config(format!(
                "ensemble model {} has a target vocabulary of {} tokens, model 1 of {v}",
                i + 1,
                m.config.tgt_vocab()
            )));
        }
        Ok(Self {
            models,
            log_probs: Vec::new(),
        })
    }
}

impl Incremental for Ensemble {
    fn vocab(&self) -> usize {
        self.models[0].config.tgt_vocab()
    }

    /// Each model's step on its own cache, then the average of their probabilities. One model
    /// alone returns its logits unchanged. After an error the cache is not to be stepped
    /// again (some models may have taken the step), as every caller does.
    fn step(&mut self, cache: &mut KvCache, tokens: &[u32]) -> Result<&[f32]> {
        let n = self.models.len();
        if n == 0 || cache.members.len() + 1 != n {
            return Err(Error::Config(
                "this cache was started by a different ensemble".into(),
            ));
        }
        if n == 1 {
            return self.models[0].step(cache, tokens);
        }
        let (first, rest) = self.models.split_first_mut().expect("at least one model");
        let mut members = std::mem::take(&mut cache.members);
        let stepped = first.step(cache, tokens).map(|z| {
            self.log_probs.clear();
            self.log_probs.extend_from_slice(z);
        });
        let v = first.config.tgt_vocab();
        // Σᵢ softmax(zᵢ), row by row; the first model's probabilities start the sum.
        let step_all = || -> Result<()> {
            stepped?;
            self.log_probs
                .chunks_exact_mut(v)
                .for_each(|row| softmax_into(row, None));
            for (m, c) in rest.iter_mut().zip(&mut members) {
                let z = m.step(c, tokens)?;
                let rows = self.log_probs.chunks_exact_mut(v).zip(z.chunks_exact(v));
                rows.for_each(|(sum, z)| softmax_into(sum, Some(z)));
            }
            Ok(())
        };
        let done = step_all();
        cache.members = members;
        done?;
        ln_minus(&mut self.log_probs, (n as f32).ln());
        Ok(&self.log_probs)
    }
}

impl EncoderDecoder for Ensemble {
    fn max_len(&self) -> usize {
        self.models
            .iter()
            .map(|m| m.config.max_len)
            .min()
            .unwrap_or(0)
    }

    fn start_decoding(&mut self, src: Tokens, max_len: usize) -> Result<KvCache> {
        // Every cache gets the same capacity, so the models stop together.
        let capacity = max_len.min(self.max_len());
        let (first, rest) = self.models.split_first_mut().expect("at least one model");
        let mut cache = first.start_decoding(src, capacity)?;
        for m in rest {
            let member = m.start_decoding(src, capacity)?;
            cache.members.push(member);
        }
        Ok(cache)
    }

    fn refresh_from(&mut self, other: &Self) {
        if self.models.len() != other.models.len() {
            *self = other.clone();
            return;
        }
        for (m, o) in self.models.iter_mut().zip(&other.models) {
            m.refresh_from(o);
        }
    }

    fn parameter_sets(&self) -> usize {
        self.models.len()
    }
    /// A set per model: packs are found by their offset into one model's parameters.
    fn share_packs(&mut self, packs: Vec<Arc<SharedPacks>>) {
        let mut packs = packs.into_iter();
        for m in &mut self.models {
            m.shared_packs = packs.next();
        }
    }
}

crate::simd::multiversion! {
    /// `x` = ln `x` − `shift`, element-wise (a probability's floor is e^-87.3, as `exp`'s).
    fn ln_minus(x: &mut [f32], shift: f32) {
        x.iter_mut().for_each(|p| *p = crate::simd::ln(*p) - shift);
    }
}

crate::simd::multiversion! {
    /// `sum` = softmax(`z`) + `sum`, or with no `z` `sum` = softmax(`sum`) in place.
    fn softmax_into(sum: &mut [f32], z: Option<&[f32]>) {
        let z_row = z.unwrap_or(sum);
        let max = crate::simd::max(z_row);
        let total = crate::simd::sum_exp(z_row, max);
        let scale = 1.0 / total;
        match z {
            Some(z) => sum
                .iter_mut()
                .zip(z)
                .for_each(|(s, &x)| *s += crate::simd::exp(x - max) * scale),
            None => sum
                .iter_mut()
                .for_each(|s| *s = crate::simd::exp(*s - max) * scale),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, ModelConfig};

    fn model(seed: u64, vocab: usize) -> Seq2Seq {
        let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, vocab).unwrap();
        cfg.max_len = 16;
        cfg.dropout = 0.0;
        let mut m = Seq2Seq::new(cfg, seed).unwrap();
        // Larger weights than initialisation's, so the two models' distributions differ.
        m.params.data.iter_mut().for_each(|v| *v *= 4.0);
        m
    }

    /// Each step is log((p₁ + p₂)/2) of what the two models give alone, also after beam
    /// search's reorders (rows repeated and dropped), which must reach every model's cache.
    #[test]
    fn a_step_is_the_log_of_the_models_mean_probability_after_reorders() {
        let (a, b) = (model(3, 13), model(4, 13));
        let mut ens = Ensemble::new(vec![a.clone(), b.clone()]).unwrap();
        let mut alone = [a, b];
        let src: Vec<u32> = vec![3, 4, 5, 6, 2, 7, 8, 9, 2, 0];
        let tokens = Tokens::new(&src, 2, 5).unwrap();
        let mut cache = ens.start_decoding(tokens, 10).unwrap();
        let mut caches: Vec<KvCache> = (alone.iter_mut())
            .map(|m| m.start_decoding(tokens, 10).unwrap())
            .collect();
        let mut next = vec![1u32, 1];
        let orders: [&[usize]; 3] = [&[0, 0, 1], &[2, 0, 0, 1], &[3, 1]];
        for step in 0..4 {
            let got = ens.step(&mut cache, &next).unwrap().to_vec();
            let zs: Vec<Vec<f32>> = (alone.iter_mut().zip(&mut caches))
                .map(|(m, c)| m.step(c, &next).unwrap().to_vec())
                .collect();
            let v = ens.vocab();
            for (r, got) in got.chunks(v).enumerate() {
                let p = |z: &[f32]| -> Vec<f64> {
                    let z = &z[r * v..][..v];
                    let max = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
                    let e: Vec<f64> = z.iter().map(|&x| (x as f64 - max).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.into_iter().map(|x| x / s).collect()
                };
                let (p1, p2) = (p(&zs[0]), p(&zs[1]));
                for j in 0..v {
                    let want = ((p1[j] + p2[j]) / 2.0).ln();
                    assert!(
                        (got[j] as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                        "step {step}, row {r}, token {j}: {} vs {want}",
                        got[j]
                    );
                }
                // The models disagree, so the average is neither one.
                assert!(p1.iter().zip(&p2).any(|(x, y)| (x - y).abs() > 1e-3));
            }
            if let Some(order) = orders.get(step) {
                cache.reorder(order);
                caches.iter_mut().for_each(|c| c.reorder(order));
                next = order.iter().map(|&r| 3 + r as u32 + step as u32).collect();
            }
        }
    }

    /// A cache goes with what started it: an ensemble's cache refuses a single model's step,
    /// and an ensemble refuses a cache with another number of models.
    #[test]
    fn a_cache_is_stepped_by_what_started_it() {
        let (a, b) = (model(3, 13), model(4, 13));
        let src: Vec<u32> = vec![3, 4, 5, 2];
        let tokens = Tokens::new(&src, 1, 4).unwrap();
        let mut two = Ensemble::new(vec![a.clone(), b]).unwrap();
        let mut one = Ensemble::new(vec![a.clone()]).unwrap();
        let mut single = a;
        let mut cache = two.start_decoding(tokens, 8).unwrap();
        let err = single.step(&mut cache, &[1]).err().unwrap().to_string();
        assert!(err.contains("started by an ensemble"), "{err}");
        assert!(one.step(&mut cache, &[1]).is_err());
        let mut plain = single.start_decoding(tokens, 8).unwrap();
        let err = two.step(&mut plain, &[1]).err().unwrap().to_string();
        assert!(err.contains("a different ensemble"), "{err}");
        assert!(two.step(&mut cache, &[1]).is_ok());
    }

    #[test]
    fn models_must_share_the_target_vocabulary() {
        let err = Ensemble::new(vec![model(3, 13), model(4, 14)])
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("ensemble model 2 has a target vocabulary of 14"),
            "{err}"
        );
        assert!(Ensemble::new(Vec::new()).is_err());
    }
}
