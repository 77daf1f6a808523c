//! The copy task (the Annotated Transformer's first example): the target is the source.
//! Random symbol sequences, trained with the same trainer as the real tasks and evaluated by
//! greedy exact match; the test suite and `qkv copy` share it.

use crate::data::Seq2SeqBatch;
use crate::error::Result;
use crate::model::{Seq2Seq, Tokens};
use crate::optim::AdamWConfig;
use crate::rng::{hash, Rng};
use crate::schedule::Schedule;
use crate::train::{loss_tally, Observer, Part, Tally, TrainConfig, TrainData, Trainer};

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const FIRST_SYMBOL: u32 = 3;

/// How the copy task is trained.
#[derive(Clone, Debug)]
pub struct CopyTask {
    /// Symbols per sequence (the model sees `len + 1` positions with BOS/EOS).
    pub len: usize,
    pub vocab: usize,
    pub batch: usize,
    pub steps: u64,
    /// Seed of the training batches.
    pub seed: u64,
}

impl CopyTask {
    /// `b` random sequences of `len` symbols from `FIRST_SYMBOL..vocab` as a batch:
    /// src = seq + EOS, tgt_in = BOS + seq, tgt_out = seq + EOS.
    pub fn batch(&self, rng: &mut Rng, b: usize) -> Seq2SeqBatch {
        let n_symbols = (self.vocab as u32).saturating_sub(FIRST_SYMBOL).max(1) as u64;
        let seqs: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..self.len)
                    .map(|_| FIRST_SYMBOL + rng.below(n_symbols) as u32)
                    .collect()
            })
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..], &s[..])).collect();
        Seq2SeqBatch::new(&pairs, PAD, BOS, EOS)
    }

    /// The trainer's settings: no dropout or smoothing, AdamW without decay, inverse-sqrt
    /// warm-up to 3e-3 over 100 updates.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            max_steps: self.steps,
            schedule: Schedule::InverseSqrt {
                peak: 3e-3,
                warmup: 100,
            },
            optimizer: AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            },
            label_smoothing: 0.0,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }
}

/// An epoch is one fresh batch drawn from (seed, epoch); validation is one fixed batch.
struct CopyData<'a> {
    task: &'a CopyTask,
    valid: Seq2SeqBatch,
}

impl TrainData<Seq2Seq> for CopyData<'_> {
    fn epoch(&self, epoch: u64) -> Result<Vec<Seq2SeqBatch>> {
        let task = self.task;
        Ok(vec![
            task.batch(&mut Rng::new(hash(task.seed, epoch)), task.batch)
        ])
    }

    fn validate(&mut self, model: &mut Seq2Seq, part: Part) -> Result<Tally> {
        loss_tally(model, std::slice::from_ref(&self.valid), part)
    }
}

/// Train `model` on the copy task; `observer` sees every update.
pub fn train_copy(
    model: Seq2Seq,
    task: &CopyTask,
    observer: &mut dyn Observer,
) -> Result<Trainer<Seq2Seq>> {
    let mut trainer = Trainer::new(model, task.train_config(), None)?;
    let valid = task.batch(&mut Rng::new(hash(task.seed, u64::MAX)), task.batch);
    trainer.fit(&mut CopyData { task, valid }, observer)?;
    Ok(trainer)
}

/// Greedy decoding of `n` held-out sequences drawn with `seed`.
pub struct CopyEval {
    pub exact: usize,
    pub sources: Vec<Vec<u32>>,
    pub outputs: Vec<Vec<u32>>,
}

pub fn evaluate_copy(
    model: &mut Seq2Seq,
    task: &CopyTask,
    n: usize,
    seed: u64,
) -> Result<CopyEval> {
    let t = task.len + 1;
    let b = task.batch(&mut Rng::new(seed), n);
    let mut cache = model.start_decoding(Tokens::new(&b.src, n, t)?, t + 2)?;
    let outputs = crate::decode::greedy(model, &mut cache, BOS, EOS)?;
    let sources: Vec<Vec<u32>> = b.src.chunks(t).map(|r| r[..task.len].to_vec()).collect();
    let exact = sources.iter().zip(&outputs).filter(|(s, o)| s == o).count();
    Ok(CopyEval {
        exact,
        sources,
        outputs,
    })
}
