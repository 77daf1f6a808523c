//! `qkv copy`: train a small encoder-decoder to copy random symbol sequences, report greedy
//! exact match on held-out sequences, and save the model.

use anyhow::{Context, Result};
use qkv::model::{Family, Mode, ModelConfig, Seq2Seq, Tokens};
use qkv::optim::{AdamW, AdamWConfig};
use qkv::rng::Rng;
use qkv::schedule::Schedule;
use qkv::toy::{copy_batch, BOS, EOS, PAD};
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
    let mut rng = Rng::new(a.seed + 1);
    let t = a.len + 1;
    let start = Instant::now();
    for step in 1..=a.steps {
        let (src, tin, tout) = copy_batch(&mut rng, a.batch, a.len, a.vocab);
        model.forward(
            Tokens::new(&src, a.batch, t)?,
            Tokens::new(&tin, a.batch, t)?,
            Mode::EVAL,
        )?;
        let loss = model.backward(&tout, 0.0)?;
        opt.step(&mut model.params, schedule.lr(step))?;
        if step % 100 == 0 || step == a.steps {
            eprintln!(
                "step {step:>5}  loss {loss:.4}  lr {:.2e}  {:.1}s",
                schedule.lr(step),
                start.elapsed().as_secs_f32()
            );
        }
    }
    let n = 200;
    let (src, _, _) = copy_batch(&mut Rng::new(a.seed + 999), n, a.len, a.vocab);
    let out = model.greedy(Tokens::new(&src, n, t)?, BOS, EOS, t + 1)?;
    let exact = out
        .iter()
        .enumerate()
        .filter(|(i, o)| o.as_slice() == &src[i * t..i * t + a.len])
        .count();
    println!(
        "held-out exact match: {exact}/{n} ({:.1}%)",
        100.0 * exact as f64 / n as f64
    );
    for (i, o) in out.iter().take(3).enumerate() {
        println!(
            "  source {:?}\n  output {:?}",
            &src[i * t..i * t + a.len],
            o
        );
    }
    qkv::checkpoint::save(&a.out, &model.config, &model.params, Some(&opt))
        .with_context(|| format!("saving to {}", a.out.display()))?;
    println!("model saved to {}", a.out.display());
    Ok(())
}
