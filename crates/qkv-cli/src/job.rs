//! A training job: task, data, tokenizer, model, trainer and decoding settings in one JSON file
//! (`configs/*.json`), with command-line overrides. Relative data paths are resolved against the
//! config file's directory, so a job runs the same from any working directory.

use anyhow::{bail, Context, Result};
use qkv::model::{Family, ModelConfig};
use qkv::train::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Translate,
    Classify,
    Lm,
}

impl Task {
    pub fn family(self) -> Family {
        match self {
            Task::Translate => Family::Seq2seq,
            Task::Classify => Family::Classifier,
            Task::Lm => Family::Lm,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPaths {
    pub train: PathBuf,
    pub valid: PathBuf,
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Skip (and count) malformed lines instead of stopping at the first.
    #[serde(default)]
    pub skip_malformed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Train a joint BPE vocabulary of this size on the training text…
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Lowercase the text before the trained BPE vocabulary sees it (an uncased vocabulary;
    /// outputs decode in lowercase). Ignored with `path`.
    #[serde(default)]
    pub lowercase: bool,
    /// …or load this `tokenizer.json` (BPE, WordPiece or Unigram).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Translation: one vocabulary for both sides (and shared embeddings possible), or one
    /// per side (`tokenizer.json` for the source, `target_tokenizer.json` for the target).
    #[serde(default = "yes")]
    pub joint: bool,
}

fn yes() -> bool {
    true
}

fn default_vocab() -> usize {
    8000
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSpec {
    #[serde(default = "default_beam")]
    pub beam: usize,
    #[serde(default = "one")]
    pub length_penalty: f32,
    #[serde(default = "default_a")]
    pub max_len_a: f32,
    #[serde(default = "default_b")]
    pub max_len_b: usize,
}

fn default_beam() -> usize {
    4
}
fn one() -> f32 {
    1.0
}
fn default_a() -> f32 {
    1.5
}
fn default_b() -> usize {
    10
}

impl Default for DecodeSpec {
    fn default() -> Self {
        Self {
            beam: default_beam(),
            length_penalty: 1.0,
            max_len_a: default_a(),
            max_len_b: default_b(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub task: Task,
    pub data: DataPaths,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: TokenizerSpec,
    /// `{"preset": "small", …fields of ModelConfig to override}`; vocabulary sizes and the class
    /// count come from the data.
    pub model: serde_json::Value,
    pub train: TrainConfig,
    #[serde(default)]
    pub decode: DecodeSpec,
    /// Run directory (checkpoints, metrics, tokenizer).
    pub out: PathBuf,
    /// Classification: fine-tune this pretrained Hugging Face BERT-family encoder (its
    /// config, weights and tokenizer; `model` then only overrides fields such as dropout,
    /// max_len or attention) instead of training one from scratch.
    #[serde(default)]
    pub pretrained: Option<PathBuf>,
    /// Sample translations / generations printed at the end.
    #[serde(default = "default_samples")]
    pub samples: usize,
}

fn default_tokenizer() -> TokenizerSpec {
    TokenizerSpec {
        vocab_size: default_vocab(),
        lowercase: false,
        path: None,
        joint: true,
    }
}
fn default_samples() -> usize {
    3
}

impl Job {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut job: Job = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid job config", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut job.data.train);
        fix(&mut job.data.valid);
        if let Some(t) = &mut job.data.test {
            fix(t);
        }
        if let Some(t) = &mut job.tokenizer.path {
            fix(t);
        }
        if let Some(p) = &mut job.pretrained {
            fix(p);
        }
        if job.pretrained.is_some() && job.task != Task::Classify {
            bail!(
                "{}: `pretrained` encoders are fine-tuned by the classify task only",
                path.display()
            );
        }
        fix(&mut job.out);
        Ok(job)
    }

    /// The model config: preset, then overrides, then what the data decides (vocabulary size,
    /// padding id, class count).
    pub fn model_config(&self, vocab: usize, pad_id: u32, n_classes: usize) -> Result<ModelConfig> {
        self.model_config_over(None, vocab, pad_id, n_classes)
    }

    /// As `model_config`, starting from `base` (a pretrained model's config) instead of a preset.
    pub fn model_config_over(
        &self,
        base: Option<&ModelConfig>,
        vocab: usize,
        pad_id: u32,
        n_classes: usize,
    ) -> Result<ModelConfig> {
        let mut spec = self.model.clone();
        let obj = spec
            .as_object_mut()
            .context("`model` must be a JSON object")?;
        let has_preset = obj.contains_key("preset");
        let preset = obj
            .remove("preset")
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .context("`model.preset` must be a string")
            })
            .transpose()?
            .unwrap_or_else(|| "small".to_string());
        let base = match base {
            Some(b) => {
                if has_preset {
                    bail!("`model.preset` does not apply to a pretrained encoder");
                }
                b.clone()
            }
            None => ModelConfig::preset(&preset, self.task.family(), vocab)?,
        };
        let mut merged = serde_json::to_value(&base)?;
        let m = merged.as_object_mut().context("model config")?;
        for (k, v) in obj.iter() {
            if !m.contains_key(k) {
                bail!(
                    "unknown model field `{k}` (fields: {})",
                    m.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            m.insert(k.clone(), v.clone());
        }
        m.insert("vocab_size".into(), vocab.into());
        m.insert("pad_id".into(), pad_id.into());
        if self.task == Task::Translate {
            m.insert("tgt_vocab_size".into(), serde_json::Value::Null);
        }
        if self.task == Task::Classify {
            m.insert("n_classes".into(), n_classes.into());
        }
        let cfg: ModelConfig = serde_json::from_value(merged).context("model config")?;
        cfg.validate()?;
        Ok(cfg)
    }
}
