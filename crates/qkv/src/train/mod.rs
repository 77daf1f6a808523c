//! The training loop: token-budget batches, gradient accumulation, a learning-rate schedule,
//! AdamW with clipping, periodic validation, and checkpoints that make resuming exact.
//!
//! Each update zeroes the gradients, then runs a forward/backward pair per micro-batch, each
//! backward adding its share (`scale = its targets / the update's targets`) of the update's
//! mean-loss gradient: accumulation copies nothing.
//!
//! Exactness: everything random is a function of `(seed, step)` or `(seed, epoch)` — batch
//! order ([`crate::data::batches_by_tokens`]) and dropout masks — and a checkpoint stores the
//! parameters, the optimizer moments, the position in the epoch and the fitted horizon, so a
//! resumed run computes the same losses as one that was never interrupted.
//!
//! Data parallel ([`crate::dist`]): with a [`Collective`] of K ranks, each update's batches
//! are split by rows across the ranks and the gradients summed; validation is split and its
//! sums reduced; rank 0's clock and stop request decide for all; rank 0 alone has the run
//! directory. At K = 1 ([`Solo`]) every collective is the identity.
//!
//! Time limits: with `time_limit_s`, the trainer times the first updates after warm-up and a
//! validation, then fits the run's horizon (the update its schedule ends at) to the time left
//! ([`budget`]), again every 5% of the run until the schedule's cooldown to its floor begins
//! ([`crate::schedule::Fitted`]). The horizon is saved in the trainer state: a resumed run
//! continues from it, and once the cooldown has begun it ends exactly as the uninterrupted
//! run would.

mod average;
mod budget;
mod config;
mod run_dir;

pub use average::{average_checkpoints, average_checkpoints_on};
pub use config::{BestMetric, TrainConfig};
pub use run_dir::{
    load_state, load_train_config, read_metrics, MetricsRow, RowKind, RunDir, BEST_DIR,
    METRICS_FILE, TRAINER_STATE_FILE, TRAIN_CONFIG_FILE,
};

use crate::backend::{Backend, Cpu};
use crate::data::Rows;
use crate::dist::{Collective, Solo};
use crate::error::{Error, Result};
use crate::kernels::matmul::set_matmul_precision;
use crate::model::{Mode, Model};
use crate::optim::AdamW;
use crate::rng::hash;
use crate::schedule::Fitted;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

/// Where a run stands; saved in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainerState {
    /// Updates done.
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Best validation score so far (higher is better) and its step.
    pub best: Option<(f64, u64)>,
    /// Training seconds before this process (resumed runs add up).
    pub elapsed_s: f64,
    /// The update the run (and its schedule) ends at, when a time limit fitted it below
    /// `max_steps`; `None` until fitted, or without a time limit.
    pub horizon: Option<u64>,
    /// Seconds one validation took when the horizon was first fitted (later fits reuse it).
    pub validation_s: Option<f64>,
}

/// One validation result: the loss per token, and optionally a task metric.
#[derive(Clone, Debug)]
pub struct Validation {
    pub loss: f64,
    /// e.g. ("accuracy", 81.3); the best checkpoint is chosen by it (higher is better), or
    /// by the loss when there is none.
    pub metric: Option<(String, f64)>,
}

impl Validation {
    /// The value the best checkpoint is selected by (higher is better): the task's metric,
    /// or the loss when there is none or `best_metric` asks for it.
    fn score(&self, best: Option<BestMetric>) -> f64 {
        match (&self.metric, best) {
            (Some((_, v)), b) if b != Some(BestMetric::Loss) => *v,
            _ => -self.loss,
        }
    }
}

/// Sums over one share of the held-out data; the shares' sums make a [`Validation`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    /// Σ −log p(target) and the targets counted.
    pub nll_sum: f64,
    pub count: f64,
    /// A task metric as (name, Σ value, Σ weight): the metric is their ratio (accuracy:
    /// 100 per correct example, over the examples).
    pub metric: Option<(String, f64, f64)>,
}

impl Tally {
    /// The validation these sums make.
    pub fn validation(&self) -> Validation {
        Validation {
            loss: self.nll_sum / self.count.max(1.0),
            metric: self
                .metric
                .as_ref()
                .map(|(name, sum, weight)| (name.clone(), sum / weight.max(1.0))),
        }
    }
}

/// Which share of held-out work is this process's: `rank` of `size` ([`crate::dist::part`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub rank: usize,
    pub size: usize,
}

impl Part {
    pub const WHOLE: Part = Part { rank: 0, size: 1 };
    /// This share's items of `n`.
    pub fn of(&self, n: usize) -> std::ops::Range<usize> {
        crate::dist::part(n, self.rank, self.size)
    }
}

/// A task's data as the trainer sees it, for a model on backend `B`.
pub trait TrainData<M: Model<B>, B: Backend = Cpu> {
    /// The batches of one epoch: a pure function of the epoch (and the job's seed).
    fn epoch(&self, epoch: u64) -> Result<Vec<M::Batch>>;
    /// Score the model on share `part` of the held-out data.
    fn validate(&mut self, model: &mut M, part: Part) -> Result<Tally>;
}

/// Progress of one update, for progress bars and logs.
#[derive(Clone, Debug)]
pub struct StepLog {
    pub step: u64,
    /// The update the run ends at: `max_steps`, or the horizon fitted to a time limit.
    pub last_step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    /// Seconds to `last_step` at the current speed.
    pub eta_s: f64,
}

/// What the trainer reports and asks while it runs.
pub trait Observer {
    fn on_step(&mut self, _log: &StepLog) {}
    fn on_validation(&mut self, _step: u64, _v: &Validation) {}
    fn on_checkpoint(&mut self, _dir: &Path) {}
    /// A time limit fitted the run to end at `horizon` updates (of `max_steps`), from
    /// `seconds_per_update` measured after warm-up.
    fn on_horizon(&mut self, _horizon: u64, _max_steps: u64, _seconds_per_update: f64) {}
    /// The average of the last `n` checkpoints validated as `v`; `best` says whether it
    /// became `best/`.
    fn on_average(&mut self, _n: usize, _v: &Validation, _best: bool) {}
    /// A line of information for the user (what the data holds, a resumed checkpoint, …).
    fn on_message(&mut self, _msg: &str) {}
    /// Polled every update; `true` saves a checkpoint and stops (Ctrl-C).
    fn should_stop(&mut self) -> bool {
        false
    }
}

impl Observer for () {}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The last update (`max_steps`, or the fitted horizon) is done.
    Finished,
    /// The time limit came before the last update.
    TimeLimit,
    Interrupted,
}

/// A model, its optimizer and the run's state: what a checkpoint holds. The optimizer's
/// moments live with the parameters, on the model's backend.
pub struct Trainer<M: Model<B>, B: Backend = Cpu> {
    pub model: M,
    pub opt: AdamW<B>,
    pub state: TrainerState,
    pub cfg: TrainConfig,
    /// Where checkpoints and metrics go; `None` trains in memory (tests, benchmarks) or on
    /// a rank other than 0.
    pub run: Option<RunDir>,
    /// The ranks this process trains with ([`Solo`] unless [`Trainer::with_collective`]).
    pub comm: Rc<dyn Collective>,
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

/// The clock of one `fit` call, counting the seconds of earlier processes too.
struct Clock {
    start: Instant,
    before: f64,
}

impl Clock {
    fn elapsed(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

impl<B: Backend, M: Model<B>> Trainer<M, B> {
    /// A fresh run: new optimizer moments, step 0.
    pub fn new(model: M, cfg: TrainConfig, run: Option<RunDir>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            opt: AdamW::on(model.backend(), cfg.optimizer.clone(), model.params().len()),
            model,
            state: TrainerState::default(),
            cfg,
            run,
            comm: Rc::new(Solo),
        })
    }

    /// Train data-parallel with the ranks of `comm`. Rank 0's model, optimizer and state are
    /// what every rank starts `fit` from.
    pub fn with_collective(mut self, comm: Rc<dyn Collective>) -> Self {
        self.comm = comm;
        self
    }

    /// Make every rank's parameters, optimizer moments and state rank 0's (a resumed run is
    /// read by rank 0 alone), after checking that the ranks train the same model the same way.
    fn share_root_state(&mut self) -> Result<()> {
        let comm = Rc::clone(&self.comm);
        let mut mine =
            serde_json::to_vec(&(&self.cfg, self.model.config(), self.model.params().len()))
                .map_err(|e| Error::Distributed(format!("encoding the training config: {e}")))?;
        let own = mine.clone();
        comm.broadcast_bytes(&mut mine, "comparing the ranks' configurations")?;
        if mine != own {
            return Err(Error::Distributed(format!(
                "rank {}'s training or model config differs from rank 0's: every rank must run the same job",
                comm.rank()
            )));
        }
        let (be, n) = (self.model.backend().clone(), self.model.params().len());
        let share = |buf: &mut B::Buf, what: &str| {
            be.host_mut(be.grow(buf, n), &mut |h| comm.broadcast_f32(h, what))
        };
        share(
            &mut self.model.params_mut().data,
            "sharing rank 0's parameters",
        )?;
        share(&mut self.opt.m, "sharing rank 0's optimizer moments")?;
        share(&mut self.opt.v, "sharing rank 0's optimizer moments")?;
        let mut state = serde_json::to_vec(&(&self.state, self.opt.step))
            .map_err(|e| Error::Distributed(format!("encoding the trainer state: {e}")))?;
        comm.broadcast_bytes(&mut state, "sharing rank 0's trainer state")?;
        (self.state, self.opt.step) = serde_json::from_slice(&state)
            .map_err(|e| Error::Distributed(format!("decoding rank 0's trainer state: {e}")))?;
        Ok(())
    }

    /// Continue from checkpoint `dir`: its parameters, optimizer moments and trainer state.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let (cfg, be) = (self.model.config().clone(), self.model.backend().clone());
        crate::checkpoint::load_on(&be, dir, &cfg, self.model.params_mut())?;
        let opt = crate::checkpoint::load_optimizer(dir, self.model.params())?;
        self.opt = AdamW::upload(&be, opt);
        self.state = load_state(dir)?;
        Ok(())
    }

    /// The update this run ends at.
    pub fn last_step(&self) -> u64 {
        self.state
            .horizon
            .unwrap_or(self.cfg.max_steps)
            .min(self.cfg.max_steps)
    }

    /// The configured schedule, cooled down by a horizon a time limit fitted (a run told
    /// to stop at `max_steps` keeps its schedule as written: resuming it with more steps
    /// continues that schedule).
    fn schedule(&self) -> Fitted {
        let horizon = self.state.horizon.filter(|&h| h < self.cfg.max_steps);
        self.cfg.schedule.fitted(horizon.unwrap_or(u64::MAX))
    }

    /// Train until the last update, the time limit or an interruption; validates and saves a
    /// checkpoint at the end (and every `valid_every` / `save_every` updates).
    pub fn fit(
        &mut self,
        data: &mut dyn TrainData<M, B>,
        observer: &mut dyn Observer,
    ) -> Result<Outcome> {
        self.cfg.validate()?;
        let _precision = set_matmul_precision(self.cfg.precision);
        if let Some(run) = &self.run {
            std::fs::create_dir_all(&run.path).map_err(crate::checkpoint::io_err(&run.path))?;
        }
        if self.comm.size() > 1 {
            self.share_root_state()?;
        }
        let clock = Clock {
            start: Instant::now(),
            before: self.state.elapsed_s,
        };
        let mut batches = data.epoch(self.state.epoch)?;
        if batches.is_empty() {
            return Err(Error::Config(
                "the training data produced no batches".into(),
            ));
        }
        let mut speed = budget::Speed::new(self.state.step);
        let (mut last_saved, mut last_validated) = (None, None);
        let outcome = loop {
            if self.state.step >= self.last_step() {
                break Outcome::Finished;
            }
            // Rank 0's clock and stop request decide for every rank.
            let mut control = [clock.elapsed(), f64::from(u8::from(observer.should_stop()))];
            self.comm.broadcast_f64(
                &mut control,
                &format!("the start of update {}", self.state.step + 1),
            )?;
            if self.cfg.time_limit_s.is_some_and(|t| control[0] >= t) {
                break Outcome::TimeLimit;
            }
            if control[1] != 0.0 {
                break Outcome::Interrupted;
            }
            // An update's time includes its logging; validations and checkpoints are
            // counted apart (the horizon fit times one validation).
            let t0 = Instant::now();
            let mut log = self.update(data, &mut batches)?;
            log.elapsed_s = clock.elapsed();
            log.tokens_per_s = speed.tokens_per_s();
            log.eta_s = speed.seconds_per_update() * (self.last_step() - log.step) as f64;
            observer.on_step(&log);
            if let Some(run) = &self.run {
                run.append_metrics(&MetricsRow {
                    step: log.step,
                    epoch: log.epoch,
                    kind: RowKind::Train,
                    loss: log.loss as f64,
                    lr: Some(log.lr as f64),
                    grad_norm: Some(log.grad_norm as f64),
                    tokens_per_s: Some(log.tokens_per_s),
                    metric: None,
                    elapsed_s: log.elapsed_s,
                })?;
            }
            speed.record(log.step, t0.elapsed().as_secs_f64(), log.tokens);
            let step = self.state.step;
            if let (Some(limit), true) = (self.cfg.time_limit_s, speed.ready()) {
                if self.fit_horizon(data, observer, &clock, &speed, limit)? {
                    last_validated = Some(step);
                }
            }
            let last = step >= self.last_step();
            if self.cfg.valid_every > 0 && step.is_multiple_of(self.cfg.valid_every) && !last {
                self.validate(data, observer, clock.elapsed())?;
                last_validated = Some(step);
            }
            if self.cfg.save_every > 0 && step.is_multiple_of(self.cfg.save_every) && !last {
                self.save_checkpoint(observer, clock.elapsed())?;
                last_saved = Some(step);
            }
        };
        if self.state.step > 0 && last_validated != Some(self.state.step) {
            self.validate(data, observer, clock.elapsed())?;
        }
        if self.state.step > 0 && last_saved != Some(self.state.step) {
            self.save_checkpoint(observer, clock.elapsed())?;
        }
        self.state.elapsed_s = clock.elapsed();
        if self.cfg.average_last > 1 && outcome != Outcome::Interrupted {
            self.average_last(data, observer)?;
        }
        Ok(outcome)
    }

    /// One optimizer update over the next `accumulate` batches (moving to the next epoch
    /// when this one runs out).
    fn update(
        &mut self,
        data: &mut dyn TrainData<M, B>,
        batches: &mut Vec<M::Batch>,
    ) -> Result<StepLog> {
        let step = self.state.step + 1;
        // The update's batches: (epoch generation, index). An update that runs past the end
        // of an epoch takes the next epoch's first batches; every batch it picked stays
        // alive until its backward.
        let mut gens = vec![std::mem::take(batches)];
        let mut picked = Vec::with_capacity(self.cfg.accumulate);
        for _ in 0..self.cfg.accumulate {
            if self.state.batch_in_epoch >= gens[gens.len() - 1].len() {
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                let next = data.epoch(self.state.epoch)?;
                if next.is_empty() {
                    return Err(Error::Config(format!(
                        "epoch {} of the training data produced no batches",
                        self.state.epoch
                    )));
                }
                gens.push(next);
            }
            picked.push((gens.len() - 1, self.state.batch_in_epoch));
            self.state.batch_in_epoch += 1;
        }
        let tokens: usize = picked
            .iter()
            .map(|&(g, i)| self.model.loss_count(&gens[g][i]))
            .sum();
        let be = self.model.backend().clone();
        self.model.params_mut().zero_grad_on(&be);
        let mut loss_sum = [0.0f64];
        // Data parallel: the last micro-batch's backward starts summing each bucket of
        // gradients across the ranks as soon as it has finished it.
        let comm = Rc::clone(&self.comm);
        let ranks = comm.size() > 1;
        let buckets = if ranks {
            self.model.grad_order()
        } else {
            Vec::new()
        };
        let mut started = 0;
        let what = format!("the gradient sum of update {step}");
        for (m, &(g, i)) in picked.iter().enumerate() {
            let seed = hash(self.cfg.seed, step * self.cfg.accumulate as u64 + m as u64);
            let mode = Mode::train(self.model.config().dropout, self.cfg.label_smoothing, seed);
            let whole = &gens[g][i];
            let shard;
            let (batch, mode) = if !ranks {
                (whole, mode)
            } else {
                let rows = self.share_of(whole);
                if rows.is_empty() {
                    continue;
                }
                shard = whole.select(rows.clone(), self.model.config().pad_id);
                (&shard, mode.rows_of(rows.start, rows.len()))
            };
            let n = self.model.loss_count(batch);
            let loss = self
                .model
                .forward(batch, mode)
                .map_err(|e| at_step(e, step))?
                .loss;
            let scale = n as f32 / tokens.max(1) as f32;
            if ranks && m + 1 == picked.len() {
                let mut failed = None;
                self.model
                    .backward_with(scale, &mut |k, grad| {
                        while started < k && failed.is_none() {
                            let r = buckets[started].clone();
                            failed = be
                                .to_host(B::sub(B::shorten(grad), r.clone()))
                                .and_then(|g| comm.start_sum(r.start, &g, &what))
                                .err();
                            started += 1;
                        }
                        if failed.is_none() {
                            failed = comm.progress().err();
                        }
                    })
                    .map_err(|e| at_step(e, step))?;
                if let Some(e) = failed {
                    return Err(e);
                }
            } else {
                self.model.backward(scale).map_err(|e| at_step(e, step))?;
            }
            loss_sum[0] += loss.mean as f64 * loss.count as f64;
        }
        if ranks {
            let n = self.model.params().len();
            let grad = &mut self.model.params_mut().grad;
            for r in &buckets[started..] {
                let g = be.to_host(B::sub(B::view(grad, n), r.clone()))?;
                comm.start_sum(r.start, &g, &what)?;
            }
            if crate::profile::enabled() {
                // Profiled runs time the wait for the slowest rank apart from the transfer.
                let _p = crate::profile::scope("waiting for the other ranks");
                comm.sum_f64(&mut [0.0], &what)?;
            }
            let _p = crate::profile::scope("gradient all-reduce (after the backward)");
            be.host_mut(be.grow(grad, n), &mut |g| comm.finish_sums(g, &what))?;
            comm.sum_f64(&mut loss_sum, &what)?;
        }
        let loss_sum = loss_sum[0];
        *batches = gens.pop().unwrap_or_default();
        let lr = self.schedule().lr(step);
        let grad_norm = self
            .opt
            .step_on(&be, self.model.params_mut(), lr)
            .map_err(|e| at_step(e, step))?;
        self.state.step = step;
        Ok(StepLog {
            step,
            last_step: self.last_step(),
            epoch: self.state.epoch,
            loss: (loss_sum / tokens.max(1) as f64) as f32,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
            eta_s: 0.0,
        })
    }

    /// This rank's rows of `batch`: about `1 / ranks` of its loss targets.
    fn share_of(&self, batch: &M::Batch) -> std::ops::Range<usize> {
        let pad = self.model.config().pad_id;
        let weights: Vec<usize> = (0..batch.rows())
            .map(|r| self.model.loss_count(&batch.select(r..r + 1, pad)))
            .collect();
        crate::dist::share(&weights, self.comm.rank(), self.comm.size())
    }

    /// Validate on every rank's share and sum the shares.
    fn validation(&mut self, data: &mut dyn TrainData<M, B>) -> Result<Validation> {
        let part = Part {
            rank: self.comm.rank(),
            size: self.comm.size(),
        };
        let mut tally = data.validate(&mut self.model, part)?;
        if part.size > 1 {
            let (msum, mweight) = tally.metric.as_ref().map_or((0.0, 0.0), |m| (m.1, m.2));
            let mut sums = [tally.nll_sum, tally.count, msum, mweight];
            self.comm.sum_f64(
                &mut sums,
                &format!("the validation sums at update {}", self.state.step),
            )?;
            tally.nll_sum = sums[0];
            tally.count = sums[1];
            if let Some(m) = &mut tally.metric {
                (m.1, m.2) = (sums[2], sums[3]);
            }
        }
        Ok(tally.validation())
    }

    /// Validate, log it, and save `best/` when the score improved.
    fn validate(
        &mut self,
        data: &mut dyn TrainData<M, B>,
        observer: &mut dyn Observer,
        elapsed_s: f64,
    ) -> Result<f64> {
        let t0 = Instant::now();
        let v = self.validation(data)?;
        let seconds = t0.elapsed().as_secs_f64();
        // A non-finite score (e.g. a diverging model) never counts as an improvement.
        let score = v.score(self.cfg.best_metric);
        let improved = score.is_finite() && self.state.best.is_none_or(|(best, _)| score > best);
        if improved {
            self.state.best = Some((score, self.state.step));
        }
        if let Some(run) = &self.run {
            run.append_metrics(&MetricsRow {
                step: self.state.step,
                epoch: self.state.epoch,
                kind: RowKind::Valid,
                loss: v.loss,
                lr: None,
                grad_norm: None,
                tokens_per_s: None,
                metric: v.metric.clone(),
                elapsed_s,
            })?;
            if improved {
                self.state.elapsed_s = elapsed_s;
                let dir = run.save(BEST_DIR, &self.model, &self.opt, &self.state, &self.cfg)?;
                observer.on_checkpoint(&dir);
            }
        }
        observer.on_validation(self.state.step, &v);
        Ok(seconds)
    }

    fn save_checkpoint(&mut self, observer: &mut dyn Observer, elapsed_s: f64) -> Result<()> {
        if let Some(run) = &self.run {
            self.state.elapsed_s = elapsed_s;
            let name = format!("checkpoint-{:07}", self.state.step);
            let dir = run.save(&name, &self.model, &self.opt, &self.state, &self.cfg)?;
            run.prune(self.cfg.keep_last)?;
            observer.on_checkpoint(&dir);
        }
        Ok(())
    }

    /// Fit the horizon to the time left: as many updates as it holds at the recent speed,
    /// with validations at their interval and the run's end (final validation, checkpoint,
    /// averaging) reserved. The first fit times a validation (returns `true`: it validated);
    /// later fits, every 5% of the run, follow the speed until the cooldown begins.
    fn fit_horizon(
        &mut self,
        data: &mut dyn TrainData<M, B>,
        observer: &mut dyn Observer,
        clock: &Clock,
        speed: &budget::Speed,
        limit: f64,
    ) -> Result<bool> {
        let step = self.state.step;
        let validated = match (self.state.horizon, self.state.validation_s) {
            (Some(h), Some(_)) => {
                let every = (h / 20).max(10);
                if step >= crate::schedule::cooldown_start(h) || !step.is_multiple_of(every) {
                    return Ok(false);
                }
                false
            }
            _ => {
                self.state.validation_s = Some(self.validate(data, observer, clock.elapsed())?);
                true
            }
        };
        let costs = budget::Costs {
            update_s: speed.seconds_per_update(),
            validation_s: self.state.validation_s.unwrap_or(0.0),
            valid_every: self.cfg.valid_every,
            final_validations: if self.cfg.average_last > 1 { 2 } else { 1 },
        };
        let fitted = costs.horizon(step, limit - clock.elapsed());
        // A slowdown never skips the cooldown: at least one's worth of updates is left.
        let fitted = fitted
            .max(step + (fitted / 5).max(1))
            .min(self.cfg.max_steps);
        // Rank 0's timings decide for every rank.
        let mut shared = [fitted as f64, self.state.validation_s.unwrap_or(0.0)];
        self.comm
            .broadcast_f64(&mut shared, &format!("the horizon fit at update {step}"))?;
        let fitted = shared[0] as u64;
        self.state.validation_s = Some(shared[1]);
        if self.state.horizon.replace(fitted) != Some(fitted) {
            observer.on_horizon(self.last_step(), self.cfg.max_steps, costs.update_s);
        }
        Ok(validated)
    }

    /// Average the last `average_last` checkpoints and validate the average; it becomes
    /// `best/` when it beats every validation so far. The model keeps its final parameters.
    fn average_last(
        &mut self,
        data: &mut dyn TrainData<M, B>,
        observer: &mut dyn Observer,
    ) -> Result<()> {
        // Rank 0 reads the checkpoints; every rank validates the average.
        let dirs: Vec<_> = match &self.run {
            Some(run) => run
                .checkpoints()?
                .into_iter()
                .rev()
                .take(self.cfg.average_last)
                .map(|(_, p)| p)
                .collect(),
            None => Vec::new(),
        };
        let mut n = [dirs.len() as f64];
        self.comm
            .broadcast_f64(&mut n, "the number of checkpoints to average")?;
        let n = n[0] as usize;
        if n < 2 || (self.run.is_none() && self.comm.size() == 1) {
            return Ok(());
        }
        let last = self.model.params().data.clone();
        let (be, len) = (self.model.backend().clone(), self.model.params().len());
        if !dirs.is_empty() {
            average_checkpoints_on(&be, &dirs, self.model.params_mut())?;
        }
        let comm = Rc::clone(&self.comm);
        be.host_mut(be.grow(&mut self.model.params_mut().data, len), &mut |h| {
            comm.broadcast_f32(h, "sharing the averaged checkpoints")
        })?;
        let v = self.validation(data)?;
        let score = v.score(self.cfg.best_metric);
        let better = score.is_finite() && self.state.best.is_none_or(|(best, _)| score > best);
        if better {
            self.state.best = Some((score, self.state.step));
            if let Some(run) = &self.run {
                let dir = run.save(BEST_DIR, &self.model, &self.opt, &self.state, &self.cfg)?;
                observer.on_checkpoint(&dir);
            }
        }
        observer.on_average(n, &v, better);
        self.model.params_mut().data = last;
        Ok(())
    }
}

/// The validation loss sums (no label smoothing) over share `part` of `batches`, forward only.
pub fn loss_tally<B: Backend, M: Model<B>>(
    model: &mut M,
    batches: &[M::Batch],
    part: Part,
) -> Result<Tally> {
    let mut tally = Tally::default();
    for b in &batches[part.of(batches.len())] {
        let loss = model.forward(b, Mode::EVAL)?.loss;
        tally.nll_sum += loss.nll_sum;
        tally.count += loss.count as f64;
    }
    Ok(tally)
}

/// Mean validation loss per target (no label smoothing) over `batches`, forward only.
pub fn mean_loss<B: Backend, M: Model<B>>(model: &mut M, batches: &[M::Batch]) -> Result<f64> {
    Ok(loss_tally(model, batches, Part::WHOLE)?.validation().loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_checkpoint_is_scored_by_the_task_metric_unless_told_loss() {
        let v = Validation {
            loss: 2.0,
            metric: Some(("accuracy".into(), 81.0)),
        };
        assert_eq!(v.score(None), 81.0);
        assert_eq!(v.score(Some(BestMetric::Accuracy)), 81.0);
        assert_eq!(v.score(Some(BestMetric::Loss)), -2.0);
        let loss_only = Validation {
            loss: 2.0,
            metric: None,
        };
        assert_eq!(loss_only.score(None), -2.0);
    }
}
