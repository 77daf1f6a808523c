//! `qkv copy`: train a small encoder-decoder to copy random symbol sequences, report greedy
//! exact match on held-out sequences, and save the model.

use anyhow::{Context, Result};
use qkv::model::{Family, ModelConfig, Seq2Seq};
use qkv::tasks::copy::{evaluate_copy, train_copy, CopyTask, PAD};
use qkv::train::{Observer, StepLog};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct CopyArgs {
    /// Training steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Symbols per sequence.
    #[arg(long, default_value_t = 10)]
    len: usize,
    /// Vocabulary size, including pad, bos and eos.
    #[arg(long, default_value_t = 13)]
    vocab: usize,
    /// Where the trained model is saved.
    #[arg(long, default_value = "runs/copy")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: CopyArgs) -> Result<()> {
    anyhow::ensure!(
        a.vocab > 4,
        "--vocab must be greater than 4 (pad, bos, eos and at least two symbols), got {}",
        a.vocab
    );
    anyhow::ensure!(
        a.len > 0 && a.batch > 0,
        "--len and --batch must be positive"
    );
    let mut cfg = ModelConfig::preset("tiny", Family::Seq2seq, a.vocab)?;
    cfg.max_len = a.len + 2;
    cfg.dropout = 0.0;
    cfg.pad_id = PAD;
    let model = Seq2Seq::new(cfg, a.seed)?;
    let task = CopyTask {
        len: a.len,
        vocab: a.vocab,
        batch: a.batch,
        steps: a.steps,
        seed: a.seed.wrapping_add(1),
    };
    let mut progress = Every100(Instant::now());
    let mut trainer = train_copy(model, &task, &mut progress)?;
    let n = 200;
    let eval = evaluate_copy(&mut trainer.model, &task, n, a.seed.wrapping_add(999))?;
    println!(
        "held-out exact match: {}/{n} ({:.1}%)",
        eval.exact,
        100.0 * eval.exact as f64 / n as f64
    );
    for (s, o) in eval.sources.iter().zip(&eval.outputs).take(3) {
        println!("  source {s:?}\n  output {o:?}");
    }
    let m = &trainer.model;
    qkv::checkpoint::save(&a.out, &m.config, &m.params, Some(&trainer.opt))
        .with_context(|| format!("saving to {}", a.out.display()))?;
    println!("model saved to {}", a.out.display());
    Ok(())
}

/// A line every 100 updates and at the last.
struct Every100(Instant);

impl Observer for Every100 {
    fn on_step(&mut self, log: &StepLog) {
        if log.step.is_multiple_of(100) || log.step == log.last_step {
            eprintln!(
                "step {:>5}  loss {:.4}  lr {:.2e}  {:.1}s",
                log.step,
                log.loss,
                log.lr,
                self.0.elapsed().as_secs_f32()
            );
        }
    }
}
