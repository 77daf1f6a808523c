//! `qkv train`: run a job (see `job.rs`) with a progress bar, Ctrl-C handling and a final
//! evaluation on the test set.

use crate::eval::{
    eval_classify, eval_lm, eval_translate, save_labels, LABELS_FILE, TARGET_TOKENIZER,
};
use crate::job::{Job, Task};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qkv::data::{read_labelled, read_parallel, read_text, Tokenizer};
use qkv::decode::{BeamConfig, Choice, Sampling};
use qkv::model::{Classifier, LanguageModel, Seq2Seq};
use qkv::optim::AdamW;
use qkv::tasks::classify::{argmax, encode_labelled, predict, Labels};
use qkv::tasks::lm::{complete, encode_text};
use qkv::tasks::translate::{check_specials, encode_pairs, TranslateOptions};
use qkv::train::{self, Observer, Outcome, RunDir, StepLog, Trainable, TrainerState, Validation};
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
    run_dir: PathBuf,
}

impl Cli {
    /// A line above the bar; on stderr directly when the bar is hidden (not a terminal), where
    /// `ProgressBar::println` would drop it and a logged run would lose its validation lines.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }
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
        if let Err(e) = crate::plot::loss_curve(&self.run_dir) {
            self.say(format!("warning: no loss curve: {e:#}"));
        }
        self.say(format!(
            "step {step}: valid loss {:.4} ppl {:.2}{metric}",
            v.loss,
            v.loss.exp()
        ));
    }
    fn on_average(&mut self, n: usize, v: &Validation, best: bool) {
        let metric = v
            .metric
            .as_ref()
            .map(|(n, x)| format!(" {n} {x:.2}"))
            .unwrap_or_default();
        self.say(format!(
            "average of the last {n} checkpoints: valid loss {:.4}{metric} — {}",
            v.loss,
            if best {
                "better than every single checkpoint: it is now best/"
            } else {
                "not better than best/, which stays"
            }
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
    // Validation and the final test evaluation run in the precision the model trains in.
    let _precision = qkv::kernels::matmul::set_matmul_precision(job.train.precision);
    // A fresh run never mixes with (or prunes) an earlier run's checkpoints and metrics.
    if !args.resume && (job.out.join("metrics.csv").exists() || job.out.join("best").exists()) {
        bail!(
            "{} already holds a run: pass --resume to continue it, or --out DIR (or remove it) to start anew",
            job.out.display()
        );
    }
    std::fs::create_dir_all(&job.out).with_context(|| format!("creating {}", job.out.display()))?;
    match job.task {
        Task::Translate => run_translate(&job, args.resume),
        Task::Classify => run_classify(&job, args.resume),
        Task::Lm => run_lm(&job, args.resume),
    }
}

/// The tokenizer of a run: reuse the run's, load the configured one, or train one.
fn tokenizer_for(
    job: &Job,
    file: &str,
    texts: impl Iterator<Item = String> + Send,
) -> Result<(Tokenizer, PathBuf)> {
    let path = job.out.join(file);
    if path.exists() {
        return Ok((Tokenizer::load(&path)?, path));
    }
    let tok = match &job.tokenizer.path {
        Some(p) => Tokenizer::load(p)?,
        None => {
            eprintln!(
                "training a BPE tokenizer ({} tokens) for {file}…",
                job.tokenizer.vocab_size
            );
            Tokenizer::train_bpe_with(
                texts,
                job.tokenizer.vocab_size,
                job.tokenizer.lowercase,
                false,
            )?
        }
    };
    tok.save(&path)?;
    Ok((tok, path))
}

fn latest_checkpoint(run: &RunDir) -> Result<Option<PathBuf>> {
    Ok(run.checkpoints()?.pop().map(|(_, p)| p))
}

/// Build or resume the optimizer and state, train, and report how it ended.
fn fit<M: Trainable>(
    job: &Job,
    run: &RunDir,
    model: &mut M,
    resume: bool,
    epoch: &dyn Fn(u64) -> Vec<M::Batch>,
    validate: &mut dyn FnMut(&mut M) -> qkv::Result<Validation>,
) -> Result<Outcome> {
    let mut opt = AdamW::new(job.train.optimizer.clone(), model.params().len());
    let mut state = TrainerState::default();
    if resume {
        match latest_checkpoint(run)? {
            Some(dir) => {
                let cfg = model.config().clone();
                qkv::checkpoint::load(&dir, &cfg, model.params_mut())?;
                opt = qkv::checkpoint::load_optimizer(&dir, model.params())?;
                state = train::load_state(&dir)?;
                eprintln!("resuming from {} (step {})", dir.display(), state.step);
            }
            None => eprintln!(
                "no checkpoint in {} yet; starting fresh",
                run.path.display()
            ),
        }
    }
    eprintln!(
        "model: {} parameters; training for {} updates",
        model.params().len(),
        job.train.max_steps
    );
    let mut cli = Cli {
        bar: progress_bar(),
        stop: ctrl_c_flag(),
        run_dir: run.path.clone(),
    };
    let t0 = Instant::now();
    let outcome = train::train(
        model,
        &mut opt,
        &mut state,
        &job.train,
        epoch,
        validate,
        Some(run),
        &mut cli,
    )?;
    cli.bar.finish_and_clear();
    eprintln!(
        "{} after {} updates in {:.0} s ({:.0} s in this process); best checkpoint: {}",
        match outcome {
            Outcome::Finished => "finished",
            Outcome::TimeLimit => "stopped at the time limit",
            Outcome::Interrupted => "interrupted; checkpoint saved",
        },
        state.step,
        state.elapsed_s,
        t0.elapsed().as_secs_f64(),
        run.path.join("best").display()
    );
    // Per update, validation included (QKV_PROFILE=1).
    crate::print_profile(state.step.max(1) as usize);
    Ok(outcome)
}

fn read_pairs(job: &Job, path: &Path, labelled: bool) -> Result<Vec<(String, String)>> {
    let r = if labelled {
        read_labelled(path, job.data.skip_malformed)?
    } else {
        read_parallel(path, job.data.skip_malformed)?
    };
    if r.skipped > 0 {
        eprintln!(
            "{}: skipped {} malformed lines (first: {})",
            path.display(),
            r.skipped,
            r.first_skipped.unwrap_or_default()
        );
    }
    Ok(r.records)
}

fn run_translate(job: &Job, resume: bool) -> Result<()> {
    let train_pairs = read_pairs(job, &job.data.train, false)?;
    let valid_pairs = read_pairs(job, &job.data.valid, false)?;
    let test_pairs = job
        .data
        .test
        .as_deref()
        .map(|p| read_pairs(job, p, false))
        .transpose()?;
    let texts = train_pairs
        .iter()
        .flat_map(|(s, t)| [s.clone(), t.clone()])
        .collect::<Vec<_>>();
    let (src_tok, tgt_tok, tok_files) = if job.tokenizer.joint {
        let (tok, path) = tokenizer_for(job, "tokenizer.json", texts.into_iter())?;
        (tok.clone(), tok, vec![path])
    } else {
        if job.tokenizer.path.is_some() {
            bail!("tokenizer.path gives one vocabulary; per-side vocabularies (joint: false) are trained from the data");
        }
        let sources = train_pairs
            .iter()
            .map(|(s, _)| s.clone())
            .collect::<Vec<_>>();
        let targets = train_pairs
            .iter()
            .map(|(_, t)| t.clone())
            .collect::<Vec<_>>();
        let (src, p1) = tokenizer_for(job, "tokenizer.json", sources.into_iter())?;
        let (tgt, p2) = tokenizer_for(job, TARGET_TOKENIZER, targets.into_iter())?;
        (src, tgt, vec![p1, p2])
    };
    check_specials(&src_tok, &tgt_tok)?;
    let mut cfg = job.model_config(src_tok.vocab_size(), src_tok.pad, 0)?;
    if !job.tokenizer.joint {
        if cfg.share_embeddings {
            bail!("share_embeddings needs one vocabulary for both sides (tokenizer.joint: true)");
        }
        cfg.tgt_vocab_size = Some(tgt_tok.vocab_size());
        cfg.validate()?;
    }
    let train_data = encode_pairs(&src_tok, &tgt_tok, &train_pairs, cfg.max_len)?;
    let valid_data = encode_pairs(&src_tok, &tgt_tok, &valid_pairs, cfg.max_len)?;
    if valid_data.pairs.is_empty() {
        bail!(
            "{}: no validation pairs (within max_len {})",
            job.data.valid.display(),
            cfg.max_len
        );
    }
    if test_pairs.as_ref().is_some_and(|t| t.is_empty()) {
        bail!("the test set is empty");
    }
    eprintln!(
        "train: {} pairs ({} dropped as longer than {} tokens), valid: {}, vocabulary {} / {}",
        train_data.pairs.len(),
        train_data.dropped_long,
        cfg.max_len,
        valid_data.pairs.len(),
        src_tok.vocab_size(),
        tgt_tok.vocab_size()
    );
    let run = RunDir {
        path: job.out.clone(),
        extra_files: tok_files,
    };
    let mut model = Seq2Seq::new(cfg.clone(), job.train.seed)?;
    let valid_batches = valid_data.epoch_batches(&tgt_tok, job.train.max_tokens, 0, 0);
    let epoch =
        |e: u64| train_data.epoch_batches(&tgt_tok, job.train.max_tokens, job.train.seed, e);
    let mut validate = |m: &mut Seq2Seq| -> qkv::Result<Validation> {
        Ok(Validation {
            loss: train::mean_loss(m, &valid_batches)?,
            metric: None,
        })
    };
    if fit(job, &run, &mut model, resume, &epoch, &mut validate)? == Outcome::Interrupted {
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
    print!("test: ");
    let hyps = eval_translate(&mut model, &src_tok, &tgt_tok, &test, &opts)?;
    std::fs::write(run.path.join("test.hyp"), hyps.join("\n") + "\n")?;
    for i in 0..job.samples.min(hyps.len()) {
        let k = i * hyps.len() / job.samples.max(1);
        println!(
            "\nsource:    {}\nreference: {}\nqkv:       {}",
            test[k].0, test[k].1, hyps[k]
        );
    }
    println!("\nmodel: {}", best.display());
    Ok(())
}

fn run_classify(job: &Job, resume: bool) -> Result<()> {
    let train_ex = read_pairs(job, &job.data.train, true)?;
    let valid_ex = read_pairs(job, &job.data.valid, true)?;
    let test_ex = job
        .data
        .test
        .as_deref()
        .map(|p| read_pairs(job, p, true))
        .transpose()?;
    let labels = Labels::from_examples(&train_ex);
    if labels.0.len() < 2 {
        bail!(
            "{}: classification needs at least 2 labels, found {:?}",
            job.data.train.display(),
            labels.0
        );
    }
    let labels_path = job.out.join(LABELS_FILE);
    save_labels(&labels_path, &labels)?;
    let pretrained = job
        .pretrained
        .as_deref()
        .map(qkv::hf::HfEncoder::open)
        .transpose()?;
    let (tok, tok_path) = match &pretrained {
        Some(enc) => {
            let path = job.out.join("tokenizer.json");
            enc.tokenizer.save(&path)?;
            (enc.tokenizer.clone(), path)
        }
        None => tokenizer_for(
            job,
            "tokenizer.json",
            train_ex
                .iter()
                .map(|(_, t)| t.clone())
                .collect::<Vec<_>>()
                .into_iter(),
        )?,
    };
    let cfg = job.model_config_over(
        pretrained.as_ref().map(|e| &e.config),
        tok.vocab_size(),
        tok.pad,
        labels.0.len(),
    )?;
    let train_data = encode_labelled(&tok, &labels, &train_ex, cfg.max_len, "train")?;
    let valid_data = encode_labelled(&tok, &labels, &valid_ex, cfg.max_len, "valid")?;
    if valid_data.examples.is_empty() || test_ex.as_ref().is_some_and(|t| t.is_empty()) {
        bail!("the validation and test sets must not be empty");
    }
    eprintln!(
        "train: {} examples, valid: {}, labels: {}, vocabulary {}",
        train_data.examples.len(),
        valid_data.examples.len(),
        labels.0.join(", "),
        tok.vocab_size()
    );
    let run = RunDir {
        path: job.out.clone(),
        extra_files: vec![tok_path, labels_path],
    };
    let mut model = Classifier::new(cfg.clone(), job.train.seed)?;
    if let Some(enc) = &pretrained {
        enc.load_weights(&mut model)?;
        eprintln!("fine-tuning {}", enc.dir.display());
    }
    let valid_batches = valid_data.epoch_batches(tok.pad, job.train.max_tokens, 0, 0);
    let epoch = |e: u64| train_data.epoch_batches(tok.pad, job.train.max_tokens, job.train.seed, e);
    let valid_texts: Vec<String> = valid_ex.iter().map(|(_, t)| t.clone()).collect();
    let gold: Vec<u32> = valid_data.examples.iter().map(|(_, l)| *l).collect();
    let mut validate = |m: &mut Classifier| -> qkv::Result<Validation> {
        let probs = predict(m, &tok, &valid_texts, job.train.max_tokens)?;
        let pred: Vec<u32> = probs.iter().map(|p| argmax(p)).collect();
        let acc = qkv::metrics::classification_report(&gold, &pred, labels.0.len()).accuracy;
        Ok(Validation {
            loss: train::mean_loss(m, &valid_batches)?,
            metric: Some(("accuracy".into(), 100.0 * acc)),
        })
    };
    if fit(job, &run, &mut model, resume, &epoch, &mut validate)? == Outcome::Interrupted {
        return Ok(());
    }
    let best = run.path.join("best");
    qkv::checkpoint::load(&best, &cfg, &mut model.params)?;
    if let Some(test) = test_ex {
        print!("test: ");
        eval_classify(&mut model, &tok, &labels, &test)?;
    }
    println!("\nmodel: {}", best.display());
    Ok(())
}

fn run_lm(job: &Job, resume: bool) -> Result<()> {
    let train_text = read_text(&job.data.train)?;
    let valid_text = read_text(&job.data.valid)?;
    let test_text = job.data.test.as_deref().map(read_text).transpose()?;
    let lines: Vec<String> = train_text
        .split_inclusive('\n')
        .map(str::to_string)
        .collect();
    let (tok, tok_path) = tokenizer_for(job, "tokenizer.json", lines.into_iter())?;
    let cfg = job.model_config(tok.vocab_size(), tok.pad, 0)?;
    let train_data = encode_text(&tok, &train_text)?;
    let valid_data = encode_text(&tok, &valid_text)?;
    let block = cfg.max_len - 1;
    eprintln!(
        "train: {} tokens, valid: {} tokens, blocks of {block}, vocabulary {}",
        train_data.ids.len(),
        valid_data.ids.len(),
        tok.vocab_size()
    );
    let run = RunDir {
        path: job.out.clone(),
        extra_files: vec![tok_path],
    };
    let mut model = LanguageModel::new(cfg.clone(), job.train.seed)?;
    let valid_batches = valid_data.epoch_batches(block, job.train.max_tokens, 0, 0)?;
    let train_batches = |e: u64| {
        train_data
            .epoch_batches(block, job.train.max_tokens, job.train.seed, e)
            .unwrap_or_default()
    };
    train_data.epoch_batches(block, job.train.max_tokens, job.train.seed, 0)?;
    let mut validate = |m: &mut LanguageModel| -> qkv::Result<Validation> {
        Ok(Validation {
            loss: train::mean_loss(m, &valid_batches)?,
            metric: None,
        })
    };
    if fit(job, &run, &mut model, resume, &train_batches, &mut validate)? == Outcome::Interrupted {
        return Ok(());
    }
    let best = run.path.join("best");
    qkv::checkpoint::load(&best, &cfg, &mut model.params)?;
    if let Some(test) = test_text {
        print!("test: ");
        eval_lm(&mut model, &tok, &test)?;
    }
    let choice = Choice::Sample(Sampling {
        temperature: 0.8,
        top_k: Some(40),
        top_p: None,
        seed: job.train.seed,
    });
    let prompts: Vec<String> = (0..job.samples).map(|_| String::new()).collect();
    for (i, text) in complete(&mut model, &tok, &prompts, 120, &choice)?
        .iter()
        .enumerate()
    {
        println!("\nsample {}:\n{text}", i + 1);
    }
    println!("\nmodel: {}", best.display());
    Ok(())
}
