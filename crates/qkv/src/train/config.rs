//! How a model is trained: plain serde data, saved beside every checkpoint. Every field has
//! a default, so a job names only what it changes (as fairseq's and OpenNMT's options), and
//! an unknown field is an error naming it.

use crate::backend::Device;
use crate::error::{Error, Result};
use crate::kernels::matmul::Precision;
use crate::optim::AdamWConfig;
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer updates to run (default 1000). With `time_limit_s` this is an upper bound:
    /// the trainer may fit a shorter horizon to the time.
    pub max_steps: u64,
    /// Padded tokens per batch (fairseq's `--max-tokens`; default 4096).
    pub max_tokens: usize,
    /// Batches whose gradients are summed per update, token-weighted (default 1).
    pub accumulate: usize,
    /// The learning rate at every update (default: the paper's inverse square root with
    /// 4,000 warm-up updates, peak 7e-4).
    pub schedule: Schedule,
    /// AdamW's moments, decay and clipping (default: §5.3's β and ε, decay 0.01, clip 1.0).
    pub optimizer: AdamWConfig,
    /// §5.4: ε_ls = 0.1 (default).
    pub label_smoothing: f32,
    /// Seed of batch order and dropout (the model's initialization has its own; default 1).
    pub seed: u64,
    /// Validate every this many updates (0, the default: only at the end).
    pub valid_every: u64,
    /// Save a checkpoint every this many updates (0, the default: only at the end).
    pub save_every: u64,
    /// Checkpoints kept besides `best/` (default 2).
    pub keep_last: usize,
    /// Stop (saving a checkpoint) after this many seconds of training, if set. The trainer
    /// then measures its speed after warm-up and fits the schedule's horizon to the time, so
    /// the run ends its schedule inside the limit on any machine.
    pub time_limit_s: Option<f64>,
    /// Operand precision of the matrix products: `"bf16"` is mixed precision (bf16 operands on
    /// avx512_bf16, f32 sums, f32 weights, gradients and optimizer state), as `torch.autocast`;
    /// default `"f32"`.
    pub precision: Precision,
    /// At the end, average the parameters of the last this many checkpoints (§6.1: "averaging
    /// the last 5 checkpoints"); the average replaces `best/` when it validates better.
    /// 0 or 1 (the default): off. Needs `keep_last` at least as large.
    pub average_last: usize,
    /// What `best/` is chosen by (fairseq's `--best-checkpoint-metric`, Hugging Face's
    /// `metric_for_best_model`); default: the task's metric (a classifier's accuracy),
    /// otherwise the validation loss. A decoding metric decodes the validation sources with
    /// the job's `decode` at every validation.
    pub best_metric: Option<BestMetric>,
    /// Where the model trains: `"cpu"` (default) or `"cuda"` (the first NVIDIA GPU; its
    /// products in TF32, or bf16 with `precision` `"bf16"`), validating there (a decoding
    /// `best_metric` decodes there too); the final test runs on the CPU from the best
    /// checkpoint's parameters.
    pub device: Device,
}

/// A score the best checkpoint can be chosen by; names as the metrics' own tools print
/// them (`rouge-score`'s `rougeL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BestMetric {
    #[serde(rename = "loss")]
    Loss,
    #[serde(rename = "accuracy")]
    Accuracy,
    /// sacreBLEU's corpus BLEU.
    #[serde(rename = "bleu")]
    Bleu,
    /// sacreBLEU's corpus chrF.
    #[serde(rename = "chrf")]
    Chrf,
    /// Mean ROUGE F1 over the examples, as `rouge-score` with the stemmer.
    #[serde(rename = "rouge1")]
    Rouge1,
    #[serde(rename = "rouge2")]
    Rouge2,
    #[serde(rename = "rougeL")]
    RougeL,
}

impl BestMetric {
    /// The name in `metrics.csv` and the logs.
    pub fn name(self) -> &'static str {
        match self {
            BestMetric::Loss => "loss",
            BestMetric::Accuracy => "accuracy",
            BestMetric::Bleu => "bleu",
            BestMetric::Chrf => "chrf",
            BestMetric::Rouge1 => "rouge1",
            BestMetric::Rouge2 => "rouge2",
            BestMetric::RougeL => "rougeL",
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            max_tokens: 4096,
            accumulate: 1,
            schedule: Schedule::default(),
            optimizer: AdamWConfig::default(),
            label_smoothing: 0.1,
            seed: 1,
            valid_every: 0,
            save_every: 0,
            keep_last: 2,
            time_limit_s: None,
            precision: Precision::F32,
            average_last: 0,
            best_metric: None,
            device: Device::Cpu,
        }
    }
}

impl TrainConfig {
    /// Reject settings the trainer cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (field, value) in [
            ("max_steps", self.max_steps),
            ("max_tokens", self.max_tokens as u64),
            ("accumulate", self.accumulate as u64),
        ] {
            if value == 0 {
                return bad(format!("train.{field} must be at least 1, got 0"));
            }
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if self
            .time_limit_s
            .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            return bad(format!(
                "time_limit_s must be a positive number of seconds, got {:?}",
                self.time_limit_s
            ));
        }
        if self.average_last > 1 && self.keep_last < self.average_last {
            return bad(format!(
                "average_last = {} needs keep_last ≥ {} (it averages kept checkpoints), got {}",
                self.average_last, self.average_last, self.keep_last
            ));
        }
        self.schedule.validate()?;
        self.optimizer.validate()
    }
}
