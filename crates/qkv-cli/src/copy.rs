//! `qkv copy`: train a small encoder-decoder to copy random symbol sequences, report greedy
//! exact match on held-out sequences, and save the model.

use anyhow::{Context, Result};
use qkv::model::{Family, ModelConfig, Seq2Seq};
use qkv::toy::{evaluate_copy, train_copy, CopyTask, PAD};
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
    let mut model = Seq2Seq::new(cfg, a.seed)?;
    let task = CopyTask {
        len: a.len,
        vocab: a.vocab,
        batch: a.batch,
        steps: a.steps,
        seed: a.seed + 1,
    };
    let start = Instant::now();
    let opt = train_copy(&mut model, &task, &mut |step, loss, lr| {
        if step % 100 == 0 || step == a.steps {
            eprintln!(
                "step {step:>5}  loss {loss:.4}  lr {lr:.2e}  {:.1}s",
                start.elapsed().as_secs_f32()
            );
        }
    })?;
    let n = 200;
    let eval = evaluate_copy(&mut model, &task, n, a.seed + 999)?;
    println!(
        "held-out exact match: {}/{n} ({:.1}%)",
        eval.exact,
        100.0 * eval.exact as f64 / n as f64
    );
    for (s, o) in eval.sources.iter().zip(&eval.outputs).take(3) {
        println!("  source {s:?}\n  output {o:?}");
    }
    qkv::checkpoint::save(&a.out, &model.config, &model.params, Some(&opt))
        .with_context(|| format!("saving to {}", a.out.display()))?;
    println!("model saved to {}", a.out.display());
    Ok(())
}
