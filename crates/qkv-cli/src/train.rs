//! `qkv train`: run a job (see `job.rs`) with a progress bar, Ctrl-C handling and a final
//! evaluation on the test set.

use crate::job::{Job, Task};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qkv::data::{read_parallel, Tokenizer};
use qkv::decode::BeamConfig;
use qkv::metrics::sacrebleu::{corpus_bleu, corpus_chrf, BleuOptions, ChrfOptions};
use qkv::model::{Model, Seq2Seq};
use qkv::optim::AdamW;
use qkv::tasks::translate::{encode_pairs, translate, TranslateOptions};
use qkv::train::{self, Observer, Outcome, RunDir, StepLog, TrainerState, Validation};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Job config (JSON): task, data, tokenizer, model, trainer, decoding.
    #[arg(long)]
    pub config: PathBuf,
    /// Override the run directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override the number of updates.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Override the time limit in seconds.
    #[arg(long)]
    pub time_limit: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the latest checkpoint in the run directory.
    #[arg(long)]
    pub resume: bool,
}

/// Progress bar, metrics echo and the Ctrl-C flag.
struct Cli {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
}

impl Observer for Cli {
    fn on_step(&mut self, log: &StepLog) {
        self.bar.set_length(log.max_steps);
        self.bar.set_position(log.step);
        self.bar.set_message(format!(
            "loss {:.3} lr {:.2e} {:.0} tok/s ep {}",
            log.loss, log.lr, log.tokens_per_s, log.epoch
        ));
    }
    fn on_validation(&mut self, step: u64, v: &Validation) {
        let metric = v
            .metric
            .as_ref()
            .map(|(n, x)| format!(" {n} {x:.2}"))
            .unwrap_or_default();
        self.bar.println(format!(
            "step {step}: valid loss {:.4} ppl {:.2}{metric}",
            v.loss,
            v.loss.exp()
        ));
    }
    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar
}

fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // A second Ctrl-C while saving would be lost; the first one already stops at the next step.
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::Relaxed));
    flag
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut job = Job::load(&args.config)?;
    if let Some(out) = args.out {
        job.out = out;
    }
    if let Some(s) = args.max_steps {
        job.train.max_steps = s;
    }
    if let Some(t) = args.time_limit {
        job.train.time_limit_s = Some(t);
    }
    if let Some(s) = args.seed {
        job.train.seed = s;
    }
    job.train.validate()?;
    std::fs::create_dir_all(&job.out).with_context(|| format!("creating {}", job.out.display()))?;
    match job.task {
        Task::Translate => run_translate(&job, args.resume),
        Task::Classify | Task::Lm => bail!("task {:?} is not wired into `qkv train` yet", job.task),
    }
}

/// The tokenizer of a run: reuse the run's, load the configured one, or train one.
fn tokenizer_for(
    job: &Job,
    texts: impl Iterator<Item = String> + Send,
) -> Result<(Tokenizer, PathBuf)> {
    let path = job.out.join("tokenizer.json");
    if path.exists() {
        return Ok((Tokenizer::load(&path)?, path));
    }
    let tok = match &job.tokenizer.path {
        Some(p) => Tokenizer::load(p)?,
        None => {
            eprintln!(
                "training a BPE tokenizer ({} tokens)…",
                job.tokenizer.vocab_size
            );
            Tokenizer::train_bpe(texts, job.tokenizer.vocab_size, false)?
        }
    };
    tok.save(&path)?;
    Ok((tok, path))
}

fn latest_checkpoint(run: &RunDir) -> Result<Option<PathBuf>> {
    Ok(run.checkpoints()?.pop().map(|(_, p)| p))
}

fn run_translate(job: &Job, resume: bool) -> Result<()> {
    let read = |p: &Path| -> Result<Vec<(String, String)>> {
        let r = read_parallel(p, job.data.skip_malformed)?;
        if r.skipped > 0 {
            eprintln!(
                "{}: skipped {} malformed lines (first: {})",
                p.display(),
                r.skipped,
                r.first_skipped.unwrap_or_default()
            );
        }
        Ok(r.records)
    };
    let train_pairs = read(&job.data.train)?;
    let valid_pairs = read(&job.data.valid)?;
    let test_pairs = job.data.test.as_deref().map(read).transpose()?;
    let texts = train_pairs
        .iter()
        .flat_map(|(s, t)| [s.clone(), t.clone()])
        .collect::<Vec<_>>();
    let (tok, tok_path) = tokenizer_for(job, texts.into_iter())?;
    let cfg = job.model_config(tok.vocab_size(), 0)?;
    let train_data = encode_pairs(&tok, &train_pairs, cfg.max_len)?;
    let valid_data = encode_pairs(&tok, &valid_pairs, cfg.max_len)?;
    eprintln!(
        "train: {} pairs ({} dropped as longer than {} tokens), valid: {}, vocabulary {}",
        train_data.pairs.len(),
        train_data.dropped_long,
        cfg.max_len,
        valid_data.pairs.len(),
        tok.vocab_size()
    );
    let run = RunDir {
        path: job.out.clone(),
        extra_files: vec![tok_path],
    };
    let mut model = Seq2Seq::new(cfg.clone(), job.train.seed)?;
    let mut opt = AdamW::new(job.train.optimizer.clone(), model.params().len());
    let mut state = TrainerState::default();
    if resume {
        match latest_checkpoint(&run)? {
            Some(dir) => {
                qkv::checkpoint::load(&dir, &cfg, &mut model.params)?;
                opt = qkv::checkpoint::load_optimizer(&dir, &model.params)?;
                state = train::load_state(&dir)?;
                eprintln!("resuming from {} (step {})", dir.display(), state.step);
            }
            None => eprintln!(
                "no checkpoint in {} yet; starting fresh",
                run.path.display()
            ),
        }
    }
    let n_params = model.params().len();
    eprintln!(
        "model: {n_params} parameters; training for {} updates",
        job.train.max_steps
    );
    let valid_batches = valid_data.epoch_batches(&tok, job.train.max_tokens, 0, 0);
    let epoch = |e: u64| train_data.epoch_batches(&tok, job.train.max_tokens, job.train.seed, e);
    let mut validate = |m: &mut Seq2Seq| -> qkv::Result<Validation> {
        Ok(Validation {
            loss: train::mean_loss(m, &valid_batches)?,
            metric: None,
        })
    };
    let mut cli = Cli {
        bar: progress_bar(),
        stop: ctrl_c_flag(),
    };
    let t0 = Instant::now();
    let outcome = train::train(
        &mut model,
        &mut opt,
        &mut state,
        &job.train,
        &epoch,
        &mut validate,
        Some(&run),
        &mut cli,
    )?;
    cli.bar.finish_and_clear();
    eprintln!(
        "{} after {} updates in {:.0} s ({:.0} s in this process)",
        match outcome {
            Outcome::Finished => "finished",
            Outcome::TimeLimit => "stopped at the time limit",
            Outcome::Interrupted => "interrupted; checkpoint saved",
        },
        state.step,
        state.elapsed_s,
        t0.elapsed().as_secs_f64()
    );
    if outcome == Outcome::Interrupted {
        return Ok(());
    }
    let best = run.path.join("best");
    qkv::checkpoint::load(&best, &cfg, &mut model.params)?;
    let Some(test) = test_pairs else {
        return Ok(());
    };
    let opts = TranslateOptions {
        beam: BeamConfig {
            beam: job.decode.beam,
            length_penalty: job.decode.length_penalty,
            nbest: 1,
        },
        max_len_a: job.decode.max_len_a,
        max_len_b: job.decode.max_len_b,
        ..TranslateOptions::default()
    };
    let t1 = Instant::now();
    let sources: Vec<String> = test.iter().map(|(s, _)| s.clone()).collect();
    let refs: Vec<String> = test.iter().map(|(_, t)| t.clone()).collect();
    let hyps: Vec<String> = translate(&mut model, &tok, &sources, &opts)?
        .into_iter()
        .map(|mut h| h.swap_remove(0))
        .collect();
    let bleu = corpus_bleu(&hyps, &[refs.clone()], &BleuOptions::default())?;
    let chrf = corpus_chrf(&hyps, &[refs.clone()], &ChrfOptions::default())?;
    std::fs::write(run.path.join("test.hyp"), hyps.join("\n") + "\n")?;
    println!(
        "test ({} sentences, beam {}, {:.0} s): {bleu}",
        hyps.len(),
        job.decode.beam,
        t1.elapsed().as_secs_f64()
    );
    println!("test: {chrf}");
    for i in 0..job.samples.min(hyps.len()) {
        let k = i * hyps.len() / job.samples.max(1);
        println!(
            "\nsource:    {}\nreference: {}\nqkv:       {}",
            sources[k], refs[k], hyps[k]
        );
    }
    println!("\nmodel: {}", best.display());
    Ok(())
}
