//! The training loop: token-budget batches, gradient accumulation, a learning-rate schedule,
//! AdamW with clipping, periodic validation, and checkpoints that make resuming exact.
//!
//! Exactness: everything random is a function of `(seed, step)` or `(seed, epoch)` — batch
//! order ([`crate::data::batches_by_tokens`]) and dropout masks — and a checkpoint stores the
//! parameters, the optimizer moments and the position in the epoch, so a resumed run computes
//! the same losses as one that was never interrupted.
//!
//! Run directory layout (written here; the CLI only draws progress):
//! `checkpoint-<step>/` (the last `keep_last`), `best/` (best validation metric), each holding
//! `model.safetensors`, `config.json`, `optimizer.safetensors`, `trainer_state.json`,
//! `train_config.json` and any extra files (e.g. `tokenizer.json`); and `metrics.csv`.

use crate::checkpoint::{self, write_atomic};
use crate::data::{ClassifyBatch, LmBatch, Seq2SeqBatch};
use crate::error::{Error, Result};
use crate::kernels::loss::cross_entropy_forward_backward;
use crate::kernels::matmul::{set_matmul_precision, Precision};
use crate::model::{Classifier, LanguageModel, Mode, Model, Seq2Seq, Tokens};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::hash;
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const TRAIN_CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.csv";

/// A model the trainer can drive: one batch type, a training step and a validation loss.
pub trait Trainable: Model {
    type Batch;
    /// Forward and backward in `mode`: returns (mean loss per counted token, counted tokens)
    /// and leaves the gradient of that mean in `params.grad`.
    fn train_batch(
        &mut self,
        batch: &Self::Batch,
        mode: Mode,
        label_smoothing: f32,
    ) -> Result<(f32, usize)>;
    /// (sum of per-token losses without smoothing, counted tokens), no gradients.
    fn eval_batch(&mut self, batch: &Self::Batch) -> Result<(f64, usize)>;
}

/// Summed cross-entropy of logits (N, V) against targets, ignoring `pad`.
fn summed_ce(logits: &[f32], targets: &[u32], v: usize, pad: Option<u32>) -> (f64, usize) {
    let mut scratch = vec![0.0; logits.len()];
    let (mean, count) = cross_entropy_forward_backward(&mut scratch, logits, targets, v, pad, 0.0);
    (mean as f64 * count as f64, count)
}

impl Trainable for Seq2Seq {
    type Batch = Seq2SeqBatch;
    fn train_batch(&mut self, b: &Seq2SeqBatch, mode: Mode, ls: f32) -> Result<(f32, usize)> {
        self.forward(
            Tokens::new(&b.src, b.batch, b.src_len)?,
            Tokens::new(&b.tgt_in, b.batch, b.tgt_len)?,
            mode,
        )?;
        Ok((self.backward(&b.tgt_out, ls)?, b.n_tokens))
    }
    fn eval_batch(&mut self, b: &Seq2SeqBatch) -> Result<(f64, usize)> {
        let v = self.config.tgt_vocab();
        let pad = self.config.pad_id;
        let logits = self.forward(
            Tokens::new(&b.src, b.batch, b.src_len)?,
            Tokens::new(&b.tgt_in, b.batch, b.tgt_len)?,
            Mode::EVAL,
        )?;
        Ok(summed_ce(logits, &b.tgt_out, v, Some(pad)))
    }
}

impl Trainable for Classifier {
    type Batch = ClassifyBatch;
    fn train_batch(&mut self, b: &ClassifyBatch, mode: Mode, ls: f32) -> Result<(f32, usize)> {
        self.forward(Tokens::new(&b.tokens, b.batch, b.len)?, mode)?;
        Ok((self.backward(&b.labels, ls)?, b.batch))
    }
    fn eval_batch(&mut self, b: &ClassifyBatch) -> Result<(f64, usize)> {
        let k = self.config.n_classes;
        let logits = self.forward(Tokens::new(&b.tokens, b.batch, b.len)?, Mode::EVAL)?;
        Ok(summed_ce(logits, &b.labels, k, None))
    }
}

impl Trainable for LanguageModel {
    type Batch = LmBatch;
    fn train_batch(&mut self, b: &LmBatch, mode: Mode, ls: f32) -> Result<(f32, usize)> {
        self.forward(Tokens::new(&b.input, b.batch, b.len)?, mode)?;
        let n = b
            .target
            .iter()
            .filter(|&&t| t != self.config.pad_id)
            .count();
        Ok((self.backward(&b.target, ls)?, n))
    }
    fn eval_batch(&mut self, b: &LmBatch) -> Result<(f64, usize)> {
        let (v, pad) = (self.config.vocab_size, self.config.pad_id);
        let logits = self.forward(Tokens::new(&b.input, b.batch, b.len)?, Mode::EVAL)?;
        Ok(summed_ce(logits, &b.target, v, Some(pad)))
    }
}

/// Everything about how a model is trained; saved beside every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to run.
    pub max_steps: u64,
    /// Padded tokens per batch (fairseq's `--max-tokens`).
    pub max_tokens: usize,
    /// Batches whose gradients are summed per update (token-weighted).
    pub accumulate: usize,
    pub schedule: Schedule,
    pub optimizer: AdamWConfig,
    /// §5.4: ε_ls = 0.1.
    pub label_smoothing: f32,
    /// Seed of batch order and dropout (the model's initialization has its own).
    pub seed: u64,
    /// Validate every this many updates (0: only at the end).
    pub valid_every: u64,
    /// Save a checkpoint every this many updates (0: only at the end).
    pub save_every: u64,
    /// Checkpoints kept besides `best/`.
    pub keep_last: usize,
    /// Stop (saving a checkpoint) after this many seconds, if set.
    pub time_limit_s: Option<f64>,
    /// Operand precision of the matrix products: `"bf16"` is mixed precision (bf16 operands on
    /// avx512_bf16, f32 sums, f32 weights, gradients and optimizer state), as `torch.autocast`.
    #[serde(default)]
    pub precision: Precision,
    /// At the end, average the parameters of the last this many checkpoints (§6.1: "averaging
    /// the last 5 checkpoints"); the average replaces `best/` when it validates better.
    /// 0 or 1: off. Needs `keep_last` at least as large.
    #[serde(default)]
    pub average_last: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            max_tokens: 4096,
            accumulate: 1,
            schedule: Schedule::InverseSqrt {
                peak: 7e-4,
                warmup: 4000,
            },
            optimizer: AdamWConfig::default(),
            label_smoothing: 0.1,
            seed: 1,
            valid_every: 0,
            save_every: 0,
            keep_last: 2,
            time_limit_s: None,
            precision: Precision::F32,
            average_last: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.max_tokens == 0 || self.accumulate == 0 || self.max_steps == 0 {
            return bad("max_steps, max_tokens and accumulate must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if self.average_last > 1 && self.keep_last < self.average_last {
            return bad(format!(
                "average_last = {} needs keep_last ≥ {} (it averages kept checkpoints), got {}",
                self.average_last, self.average_last, self.keep_last
            ));
        }
        Ok(())
    }
}

/// Where a run stands; saved in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Updates done.
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Best validation metric so far and its step.
    pub best: Option<(f64, u64)>,
    /// Training seconds before this process (resumed runs add up).
    pub elapsed_s: f64,
}

/// One validation result: the loss per token, and optionally a task metric.
#[derive(Clone, Debug)]
pub struct Validation {
    pub loss: f64,
    /// e.g. ("bleu", 12.3); the best checkpoint is chosen by it when `higher_is_better`.
    pub metric: Option<(String, f64)>,
}

impl Validation {
    /// The value the best checkpoint is selected by (higher is better).
    fn score(&self) -> f64 {
        match &self.metric {
            Some((_, v)) => *v,
            None => -self.loss,
        }
    }
}

/// Progress of one update, for the CLI's progress bar.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    pub max_steps: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// What the trainer reports and asks while it runs.
pub trait Observer {
    fn on_step(&mut self, _log: &StepLog) {}
    fn on_validation(&mut self, _step: u64, _v: &Validation) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
    /// The average of the last `n` checkpoints validated as `v`; `best` says whether it
    /// became `best/`.
    fn on_average(&mut self, _n: usize, _v: &Validation, _best: bool) {}
    /// Polled every update; `true` saves a checkpoint and stops (Ctrl-C).
    fn should_stop(&mut self) -> bool {
        false
    }
}

impl Observer for () {}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Finished,
    TimeLimit,
    Interrupted,
}

/// The run directory and what goes into each checkpoint besides the model.
pub struct RunDir {
    pub path: PathBuf,
    /// Files copied into every checkpoint (e.g. `tokenizer.json`), so each is usable alone.
    pub extra_files: Vec<PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn json_err(path: &Path, e: serde_json::Error) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl RunDir {
    /// Write a checkpoint into `name/` via a temporary directory and a rename, so `name/` is
    /// always either the old complete checkpoint or the new one.
    fn save<M: Model>(
        &self,
        name: &str,
        model: &M,
        opt: &AdamW,
        state: &TrainerState,
        cfg: &TrainConfig,
    ) -> Result<PathBuf> {
        let dir = self.path.join(name);
        let tmp = self.path.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        checkpoint::save(&tmp, model.config(), model.params(), Some(opt))?;
        let state_json = serde_json::to_string_pretty(state).map_err(|e| json_err(&tmp, e))?;
        write_atomic(&tmp.join(TRAINER_STATE_FILE), state_json.as_bytes())?;
        let cfg_json = serde_json::to_string_pretty(cfg).map_err(|e| json_err(&tmp, e))?;
        write_atomic(&tmp.join(TRAIN_CONFIG_FILE), cfg_json.as_bytes())?;
        for f in &self.extra_files {
            let name = f
                .file_name()
                .ok_or_else(|| Error::Config(format!("{} has no file name", f.display())))?;
            std::fs::copy(f, tmp.join(name)).map_err(io_err(f))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    /// `checkpoint-<step>` directories, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        if !self.path.exists() {
            return Ok(out);
        }
        for entry in std::fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(step) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn prune(&self, keep: usize) -> Result<()> {
        let all = self.checkpoints()?;
        for (_, dir) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
        Ok(())
    }

    fn append_metrics(&self, line: &str) -> Result<()> {
        let path = self.path.join(METRICS_FILE);
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if new {
            writeln!(
                f,
                "step,epoch,kind,loss,lr,grad_norm,tokens_per_s,metric,value,elapsed_s"
            )
            .map_err(io_err(&path))?;
        }
        writeln!(f, "{line}").map_err(io_err(&path))
    }
}

/// Read a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(TRAINER_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| json_err(&path, e))
}

/// Read the training config saved beside a checkpoint.
pub fn load_train_config(dir: &Path) -> Result<TrainConfig> {
    let path = dir.join(TRAIN_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| json_err(&path, e))
}

/// Say at which update a loss or gradient went non-finite (nothing is saved after it).
fn at_step(e: Error, step: u64) -> Error {
    match e {
        Error::NonFinite { what, value } => Error::NonFinite {
            what: format!("{what} at step {step} (the last checkpoint is intact)"),
            value,
        },
        e => e,
    }
}

/// Train `model` from `state` (fresh: `TrainerState::default()`, resumed: [`load_state`]) for
/// `cfg.max_steps` updates. `epoch_batches(epoch)` builds an epoch's batches (deterministically);
/// `validate` scores the model on held-out data.
#[allow(clippy::too_many_arguments)]
pub fn train<M: Trainable>(
    model: &mut M,
    opt: &mut AdamW,
    state: &mut TrainerState,
    cfg: &TrainConfig,
    epoch_batches: &dyn Fn(u64) -> Vec<M::Batch>,
    validate: &mut dyn FnMut(&mut M) -> Result<Validation>,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
) -> Result<Outcome> {
    cfg.validate()?;
    let _precision = set_matmul_precision(cfg.precision);
    if let Some(run) = run {
        std::fs::create_dir_all(&run.path).map_err(io_err(&run.path))?;
    }
    let dropout = model.config().dropout;
    let start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let elapsed = |start: &Instant| elapsed_before + start.elapsed().as_secs_f64();
    let mut batches = epoch_batches(state.epoch);
    if batches.is_empty() {
        return Err(Error::Config(
            "the training data produced no batches".into(),
        ));
    }
    let mut acc: Vec<f32> = Vec::new();
    let mut window = (Instant::now(), 0usize);
    let mut last_saved = None;
    let mut last_validated = None;
    let save = |model: &M,
                opt: &AdamW,
                state: &mut TrainerState,
                observer: &mut dyn Observer,
                secs: f64|
     -> Result<()> {
        if let Some(run) = run {
            state.elapsed_s = secs;
            let dir = run.save(
                &format!("checkpoint-{:07}", state.step),
                model,
                opt,
                state,
                cfg,
            )?;
            run.prune(cfg.keep_last)?;
            observer.on_checkpoint(&dir);
        }
        Ok(())
    };
    let outcome = loop {
        if state.step >= cfg.max_steps {
            break Outcome::Finished;
        }
        if cfg.time_limit_s.is_some_and(|t| elapsed(&start) >= t) {
            break Outcome::TimeLimit;
        }
        if observer.should_stop() {
            break Outcome::Interrupted;
        }
        let step = state.step + 1;
        let mut loss_sum = 0.0f64;
        let mut tokens = 0usize;
        for m in 0..cfg.accumulate {
            // The next batch, moving to the next epoch when this one runs out.
            if state.batch_in_epoch >= batches.len() {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                batches = epoch_batches(state.epoch);
                if batches.is_empty() {
                    return Err(Error::Config(format!(
                        "epoch {} of the training data produced no batches",
                        state.epoch
                    )));
                }
            }
            let batch = &batches[state.batch_in_epoch];
            state.batch_in_epoch += 1;
            let mode = Mode::train(
                dropout,
                hash(cfg.seed, step * cfg.accumulate as u64 + m as u64),
            );
            let (loss, n) = model
                .train_batch(batch, mode, cfg.label_smoothing)
                .map_err(|e| at_step(e, step))?;
            loss_sum += loss as f64 * n as f64;
            tokens += n;
            if cfg.accumulate > 1 {
                // Token-weighted sum of the batches' mean-loss gradients, rescaled below.
                let g = &model.params().grad;
                if m == 0 {
                    acc.clear();
                    acc.extend(g.iter().map(|&x| x * n as f32));
                } else {
                    acc.iter_mut().zip(g).for_each(|(a, &x)| *a += x * n as f32);
                }
            }
        }
        if cfg.accumulate > 1 {
            let inv = 1.0 / tokens.max(1) as f32;
            let g = &mut model.params_mut().grad;
            g.iter_mut().zip(&acc).for_each(|(g, &a)| *g = a * inv);
        }
        let lr = cfg.schedule.lr(step);
        let grad_norm = opt
            .step(model.params_mut(), lr)
            .map_err(|e| at_step(e, step))?;
        state.step = step;
        window.1 += tokens;
        let secs = window.0.elapsed().as_secs_f64();
        let log = StepLog {
            step,
            max_steps: cfg.max_steps,
            epoch: state.epoch,
            loss: (loss_sum / tokens.max(1) as f64) as f32,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: window.1 as f64 / secs.max(1e-9),
            elapsed_s: elapsed(&start),
        };
        if secs > 5.0 {
            window = (Instant::now(), 0);
        }
        observer.on_step(&log);
        if let Some(run) = run {
            run.append_metrics(&format!(
                "{},{},train,{:.6},{:.3e},{:.4},{:.0},,,{:.1}",
                log.step,
                log.epoch,
                log.loss,
                log.lr,
                log.grad_norm,
                log.tokens_per_s,
                log.elapsed_s
            ))?;
        }
        let last = state.step >= cfg.max_steps;
        if cfg.valid_every > 0 && step % cfg.valid_every == 0 && !last {
            run_validation(
                model,
                opt,
                state,
                cfg,
                validate,
                run,
                observer,
                elapsed(&start),
            )?;
            last_validated = Some(step);
        }
        if cfg.save_every > 0 && step % cfg.save_every == 0 && !last {
            save(model, opt, state, observer, elapsed(&start))?;
            last_saved = Some(step);
        }
    };
    if state.step > 0 && last_validated != Some(state.step) {
        run_validation(
            model,
            opt,
            state,
            cfg,
            validate,
            run,
            observer,
            elapsed(&start),
        )?;
        if last_saved != Some(state.step) {
            save(model, opt, state, observer, elapsed(&start))?;
        }
    }
    state.elapsed_s = elapsed(&start);
    if let Some(run) = run {
        if cfg.average_last > 1 && outcome != Outcome::Interrupted {
            average_last(model, opt, state, cfg, validate, run, observer)?;
        }
    }
    Ok(outcome)
}

/// Average the last `cfg.average_last` checkpoints of `run` and validate the average; it
/// becomes `best/` when it beats every validation so far. The model keeps its final
/// parameters either way.
#[allow(clippy::too_many_arguments)]
fn average_last<M: Trainable>(
    model: &mut M,
    opt: &AdamW,
    state: &mut TrainerState,
    cfg: &TrainConfig,
    validate: &mut dyn FnMut(&mut M) -> Result<Validation>,
    run: &RunDir,
    observer: &mut dyn Observer,
) -> Result<()> {
    let dirs: Vec<PathBuf> = run
        .checkpoints()?
        .into_iter()
        .rev()
        .take(cfg.average_last)
        .map(|(_, p)| p)
        .collect();
    if dirs.len() < 2 {
        return Ok(());
    }
    let last = model.params().data.clone();
    average_checkpoints(&dirs, model.params_mut())?;
    let v = validate(model)?;
    let better = v.score().is_finite() && state.best.is_none_or(|(best, _)| v.score() > best);
    if better {
        state.best = Some((v.score(), state.step));
        let dir = run.save("best", model, opt, state, cfg)?;
        observer.on_checkpoint(&dir);
    }
    observer.on_average(dirs.len(), &v, better);
    model.params_mut().data.copy_from_slice(&last);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_validation<M: Trainable>(
    model: &mut M,
    opt: &AdamW,
    state: &mut TrainerState,
    cfg: &TrainConfig,
    validate: &mut dyn FnMut(&mut M) -> Result<Validation>,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
    elapsed_s: f64,
) -> Result<()> {
    let v = validate(model)?;
    // A non-finite score (e.g. a diverging model) never counts as an improvement.
    let improved = v.score().is_finite() && state.best.is_none_or(|(best, _)| v.score() > best);
    if improved {
        state.best = Some((v.score(), state.step));
    }
    if let Some(run) = run {
        let (name, value) = v.metric.clone().unwrap_or(("".into(), f64::NAN));
        run.append_metrics(&format!(
            "{},{},valid,{:.6},,,,{},{},{:.1}",
            state.step,
            state.epoch,
            v.loss,
            name,
            if value.is_nan() {
                String::new()
            } else {
                format!("{value:.4}")
            },
            elapsed_s
        ))?;
        if improved {
            state.elapsed_s = elapsed_s;
            let dir = run.save("best", model, opt, state, cfg)?;
            observer.on_checkpoint(&dir);
        }
    }
    observer.on_validation(state.step, &v);
    Ok(())
}

/// Mean validation loss per token over `batches`.
pub fn mean_loss<M: Trainable>(model: &mut M, batches: &[M::Batch]) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for b in batches {
        let (s, c) = model.eval_batch(b)?;
        sum += s;
        n += c;
    }
    Ok(sum / n.max(1) as f64)
}

/// Average the parameters of several checkpoints of one model (Vaswani et al. §6.1 average the
/// last 5 or 20 checkpoints) into `params`.
pub fn average_checkpoints(dirs: &[PathBuf], params: &mut crate::params::Params) -> Result<()> {
    if dirs.is_empty() {
        return Err(Error::Config("no checkpoints to average".into()));
    }
    let mut sum = vec![0.0f64; params.len()];
    for dir in dirs {
        checkpoint::load_params(&dir.join(checkpoint::MODEL_FILE), params)?;
        sum.iter_mut()
            .zip(&params.data)
            .for_each(|(s, &p)| *s += p as f64);
    }
    let inv = 1.0 / dirs.len() as f64;
    params
        .data
        .iter_mut()
        .zip(&sum)
        .for_each(|(p, &s)| *p = (s * inv) as f32);
    Ok(())
}
