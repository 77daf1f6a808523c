//! The copy task (the Annotated Transformer's first example): the target is the source.
//! Data, training loop and evaluation are here so the test suite and `qkv copy` (the default
//! job until real corpora land) share one implementation.

use crate::error::Result;
use crate::model::{Mode, Seq2Seq, Tokens};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::schedule::Schedule;

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const FIRST_SYMBOL: u32 = 3;

/// One batch of `b` random sequences of `len` symbols from `FIRST_SYMBOL..vocab`:
/// returns (src = seq + EOS, tgt_in = BOS + seq, tgt_out = seq + EOS), each (B, len + 1).
pub fn copy_batch(
    rng: &mut Rng,
    b: usize,
    len: usize,
    vocab: usize,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let n_symbols = (vocab as u32).saturating_sub(FIRST_SYMBOL).max(1) as u64;
    let (mut src, mut tin, mut tout) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..b {
        let seq: Vec<u32> = (0..len)
            .map(|_| FIRST_SYMBOL + rng.below(n_symbols) as u32)
            .collect();
        src.extend(&seq);
        src.push(EOS);
        tin.push(BOS);
        tin.extend(&seq);
        tout.extend(&seq);
        tout.push(EOS);
    }
    (src, tin, tout)
}

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

/// Train `model` (dropout off, AdamW, inverse-sqrt warmup) on fresh random batches.
/// `on_step(step, loss, lr)` is called after every update. Returns the optimizer.
pub fn train_copy(
    model: &mut Seq2Seq,
    task: &CopyTask,
    on_step: &mut dyn FnMut(u64, f32, f32),
) -> Result<AdamW> {
    let mut opt = AdamW::new(
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        model.params.len(),
    );
    let schedule = Schedule::InverseSqrt {
        peak: 3e-3,
        warmup: 100,
    };
    let mut rng = Rng::new(task.seed);
    let t = task.len + 1;
    for step in 1..=task.steps {
        let (src, tin, tout) = copy_batch(&mut rng, task.batch, task.len, task.vocab);
        model.forward(
            Tokens::new(&src, task.batch, t)?,
            Tokens::new(&tin, task.batch, t)?,
            Mode::EVAL,
        )?;
        let loss = model.backward(&tout, 0.0)?;
        let lr = schedule.lr(step);
        opt.step(&mut model.params, lr)?;
        on_step(step, loss, lr);
    }
    Ok(opt)
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
    let (src, _, _) = copy_batch(&mut Rng::new(seed), n, task.len, task.vocab);
    let mut cache = model.start_decoding(Tokens::new(&src, n, t)?, t + 2)?;
    let outputs = crate::decode::greedy(model, &mut cache, BOS, EOS)?;
    let sources: Vec<Vec<u32>> = src.chunks(t).map(|r| r[..task.len].to_vec()).collect();
    let exact = sources.iter().zip(&outputs).filter(|(s, o)| s == o).count();
    Ok(CopyEval {
        exact,
        sources,
        outputs,
    })
}
