//! A training job: task, data, tokenizer, model, trainer and decoding settings in one JSON
//! file (`configs/*.json`). Every section but `task` and `data` has defaults, so a job names
//! only what it changes; an unknown field is an error naming it. Relative paths are resolved
//! against the job file's directory, so a job runs the same from any working directory.

use crate::decode::DecodeConfig;
use crate::error::{Error, Result};
use crate::model::{Family, ModelConfig};
use crate::train::{BestMetric, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// `source<TAB>target` pairs → a Seq2Seq model; BLEU and chrF.
    Translate,
    /// `label<TAB>text` examples → a Classifier; accuracy and macro-F1.
    Classify,
    /// Plain text → a LanguageModel; perplexity and bits per character.
    Lm,
    /// `passage<TAB>summary` pairs → a Seq2Seq model; ROUGE-1/2/L (rouge-score's).
    Summarize,
}

impl TaskKind {
    pub fn family(self) -> Family {
        match self {
            TaskKind::Translate | TaskKind::Summarize => Family::Seq2seq,
            TaskKind::Classify => Family::Classifier,
            TaskKind::Lm => Family::Lm,
        }
    }

    /// The scores its validation can choose the best checkpoint by (`train.best_metric`).
    pub fn best_metrics(self) -> &'static [BestMetric] {
        use BestMetric::*;
        match self {
            TaskKind::Translate => &[Loss, Bleu, Chrf],
            TaskKind::Summarize => &[Loss, Bleu, Chrf, Rouge1, Rouge2, RougeL],
            TaskKind::Classify => &[Loss, Accuracy],
            TaskKind::Lm => &[Loss],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPaths {
    pub train: PathBuf,
    pub valid: PathBuf,
    /// Scored (and sampled from) at the end of training.
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Skip (and count) malformed lines instead of stopping at the first.
    #[serde(default)]
    pub skip_malformed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerSpec {
    /// Train a BPE vocabulary of this size on the training text (default 8000)…
    pub vocab_size: usize,
    /// Lowercase the text before the trained BPE vocabulary sees it (an uncased vocabulary;
    /// outputs decode in lowercase). Ignored with `path`.
    pub lowercase: bool,
    /// …or load this `tokenizer.json` (BPE, WordPiece or Unigram).
    pub path: Option<PathBuf>,
    /// Translation: one vocabulary for both sides (the default; shared embeddings possible),
    /// or one per side (`tokenizer.json` for the source, `target_tokenizer.json` for the
    /// target).
    pub joint: bool,
}

impl Default for TokenizerSpec {
    fn default() -> Self {
        Self {
            vocab_size: 8000,
            lowercase: false,
            path: None,
            joint: true,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    pub task: TaskKind,
    pub data: DataPaths,
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    /// `{"preset": "small", …fields of ModelConfig to override}` (default: the `small`
    /// preset); vocabulary sizes, the padding id and the class count come from the data.
    #[serde(default = "empty_object")]
    pub model: serde_json::Value,
    #[serde(default)]
    pub train: TrainConfig,
    /// How the trained model decodes; saved with it (`decode.json`).
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Run directory (checkpoints, metrics, tokenizer); default `runs/<job file name>` in
    /// the working directory.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Classification: fine-tune this pretrained Hugging Face BERT-family encoder (its
    /// config, weights and tokenizer; `model` then only overrides fields such as dropout,
    /// max_len or attention) instead of training one from scratch.
    #[serde(default)]
    pub pretrained: Option<PathBuf>,
    /// Warm start (fairseq's `--restore-file` with a fresh optimizer, OpenNMT's
    /// `train_from`): a qkv model directory whose config is the model's base (`model` only
    /// overrides fields such as dropout or max_len), whose tokenizer(s) the job reuses, and
    /// whose parameters initialise every parameter of the same name (a shape mismatch is an
    /// error naming the parameter).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Sample translations / generations printed at the end (default 3).
    #[serde(default = "default_samples")]
    pub samples: usize,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn default_samples() -> usize {
    3
}

fn job_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl Job {
    /// Read and check a job file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::checkpoint::io_err(path))?;
        let mut job: Job = serde_json::from_str(&text).map_err(|e| {
            let hint = if e.to_string().contains("unknown field `lr`") {
                " (AdamW takes its learning rate from train.schedule: set its `peak`)"
            } else {
                ""
            };
            job_err(path, format!("invalid job config: {e}{hint}"))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut job.data.train);
        fix(&mut job.data.valid);
        job.data.test.iter_mut().for_each(fix);
        job.tokenizer.path.iter_mut().for_each(fix);
        job.pretrained.iter_mut().for_each(fix);
        job.init_from.iter_mut().for_each(fix);
        match &mut job.out {
            Some(out) => fix(out),
            None => {
                let stem = path.file_stem().unwrap_or_default();
                job.out = Some(Path::new("runs").join(stem));
            }
        }
        if job.pretrained.is_some() && job.task != TaskKind::Classify {
            return Err(job_err(
                path,
                "`pretrained` encoders are fine-tuned by the classify task only",
            ));
        }
        if job.pretrained.is_some() && job.init_from.is_some() {
            return Err(job_err(
                path,
                "`pretrained` and `init_from` both name a starting model: give one",
            ));
        }
        if !job.model.is_object() {
            return Err(job_err(path, "`model` must be a JSON object"));
        }
        job.train
            .validate()
            .map_err(|e| job_err(path, e.to_string()))?;
        job.decode
            .validate()
            .map_err(|e| job_err(path, e.to_string()))?;
        if let Some(m) = job.train.best_metric {
            let allowed = job.task.best_metrics();
            if !allowed.contains(&m) {
                let names: Vec<_> = allowed.iter().map(|m| m.name()).collect();
                return Err(job_err(
                    path,
                    format!(
                        "train.best_metric \"{}\" is not scored by {} jobs (they score: {})",
                        m.name(),
                        serde_json::to_string(&job.task).unwrap_or_default(),
                        names.join(", ")
                    ),
                ));
            }
        }
        Ok(job)
    }

    /// The run directory.
    pub fn out(&self) -> &Path {
        self.out.as_deref().unwrap_or(Path::new("runs/job"))
    }

    /// The config an `init_from` directory gives: a qkv model's own, or, for a Hugging Face
    /// BERT-family encoder (translate and summarize only), that encoder under a decoder.
    fn warm_config(&self, dir: &Path) -> Result<ModelConfig> {
        if !crate::hf::is_hf_dir(dir) {
            return crate::checkpoint::load_config(dir);
        }
        match self.task {
            TaskKind::Translate | TaskKind::Summarize => {
                Ok(crate::hf::HfEncoder::open(dir)?.seq2seq_config())
            }
            TaskKind::Classify => Err(Error::Config(format!(
                "init_from {}: a Hugging Face encoder is fine-tuned by a classify job through `pretrained`",
                dir.display()
            ))),
            TaskKind::Lm => Err(Error::Config(format!(
                "init_from {}: a Hugging Face encoder has no decoder to start a language model from",
                dir.display()
            ))),
        }
    }

    /// The model config: a preset (or `base`, a pretrained model's config), then the job's
    /// overrides, then what the data decides (vocabulary size, padding id, class count).
    pub fn model_config(
        &self,
        base: Option<&ModelConfig>,
        vocab: usize,
        pad_id: u32,
        n_classes: usize,
    ) -> Result<ModelConfig> {
        let mut spec = self.model.as_object().cloned().unwrap_or_default();
        let preset = spec.remove("preset");
        let warm = match (base, &self.init_from) {
            (None, Some(dir)) => Some(self.warm_config(dir)?),
            _ => None,
        };
        let base = base.or(warm.as_ref());
        let base = match (base, preset) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "`model.preset` does not apply to a pretrained or init_from model: its config is the base".into(),
                ))
            }
            (Some(b), None) => b.clone(),
            (None, preset) => {
                let name = match &preset {
                    None => "small",
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    Some(other) => {
                        return Err(Error::Config(format!(
                            "`model.preset` must be a string, got {other}"
                        )))
                    }
                };
                ModelConfig::preset(name, self.task.family(), vocab)?
            }
        };
        let mut merged = serde_json::to_value(&base).map_err(|e| Error::Config(e.to_string()))?;
        let fields = merged
            .as_object_mut()
            .expect("a struct serializes to an object");
        for (k, v) in spec {
            if !fields.contains_key(&k) {
                return Err(Error::Config(format!(
                    "unknown model field `{k}` (fields: {})",
                    fields.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            fields.insert(k, v);
        }
        fields.insert("vocab_size".into(), vocab.into());
        fields.insert("pad_id".into(), pad_id.into());
        match self.task {
            TaskKind::Translate | TaskKind::Summarize => {
                fields.insert("tgt_vocab_size".into(), serde_json::Value::Null);
            }
            TaskKind::Classify => {
                fields.insert("n_classes".into(), n_classes.into());
            }
            TaskKind::Lm => {}
        }
        let cfg: ModelConfig =
            serde_json::from_value(merged).map_err(|e| Error::Config(format!("model: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qkv-job-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_job_naming_only_its_task_and_data_gets_every_default() {
        let path = write(
            "minimal",
            r#"{"task": "lm", "data": {"train": "t.txt", "valid": "v.txt"}}"#,
        );
        let job = Job::load(&path).unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(job.data.train, dir.join("t.txt"));
        assert_eq!(job.out(), Path::new("runs/minimal"));
        assert_eq!(job.train, TrainConfig::default());
        assert_eq!(job.decode, DecodeConfig::default());
        let cfg = job.model_config(None, 100, 0, 0).unwrap();
        assert_eq!(cfg, ModelConfig::preset("small", Family::Lm, 100).unwrap());
        // A train section naming only what it changes.
        let path = write(
            "partial",
            r#"{"task": "lm", "data": {"train": "t", "valid": "v"},
                "train": {"max_steps": 7, "optimizer": {"weight_decay": 0.1}}}"#,
        );
        let job = Job::load(&path).unwrap();
        assert_eq!(job.train.max_steps, 7);
        assert_eq!(job.train.optimizer.weight_decay, 0.1);
        assert_eq!(job.train.optimizer.beta2, 0.98);
        assert_eq!(job.train.accumulate, 1);
    }

    #[test]
    fn two_starting_models_or_a_missing_init_model_are_errors() {
        let path = write(
            "both",
            r#"{"task": "classify", "data": {"train": "t", "valid": "v"},
                "pretrained": "a", "init_from": "b"}"#,
        );
        let err = Job::load(&path).unwrap_err().to_string();
        assert!(err.contains("`pretrained` and `init_from`"), "{err}");
        let path = write(
            "missing",
            r#"{"task": "summarize", "data": {"train": "t", "valid": "v"}, "init_from": "nowhere"}"#,
        );
        let job = Job::load(&path).unwrap();
        let err = job.model_config(None, 10, 0, 0).unwrap_err().to_string();
        assert!(
            err.contains("nowhere") && err.contains("config.json"),
            "{err}"
        );
    }

    #[test]
    fn a_hugging_face_encoder_starts_seq2seq_jobs_only() {
        // Only `config.json` is read before the task is checked.
        let hf = std::env::temp_dir().join(format!("qkv-job-{}-hf", std::process::id()));
        std::fs::create_dir_all(&hf).unwrap();
        std::fs::write(hf.join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
        for (task, want) in [("classify", "`pretrained`"), ("lm", "no decoder")] {
            let text = format!(
                r#"{{"task": "{task}", "data": {{"train": "t", "valid": "v"}}, "init_from": "{}"}}"#,
                hf.display()
            );
            let job = Job::load(&write(task, &text)).unwrap();
            let err = job.model_config(None, 10, 0, 2).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains(&*hf.to_string_lossy()),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_or_inert_fields_are_errors_naming_them() {
        for (text, want) in [
            (r#""train": {"max_step": 7}"#, "max_step"),
            (r#""train": {"optimizer": {"lr": 0.001}}"#, "train.schedule"),
            (
                r#""train": {"schedule": {"kind": "cosine", "peak": 1e-3, "warmup": 1, "total": 9, "min": 0, "decay": 2}}"#,
                "decay",
            ),
            (r#""decode": {"beams": 4}"#, "beams"),
            (r#""train": {"device": "tpu"}"#, "expected `cpu` or `cuda`"),
            (r#""tokenizer": {"size": 4}"#, "size"),
            (r#""train": {"label_smoothing": 1.5}"#, "label_smoothing"),
            (r#""train": {"time_limit_s": -5}"#, "time_limit_s"),
            (
                r#""train": {"optimizer": {"beta2": 1.0}}"#,
                "optimizer.beta2",
            ),
            (
                r#""train": {"optimizer": {"clip_norm": 0}}"#,
                "optimizer.clip_norm",
            ),
            (
                r#""train": {"schedule": {"kind": "constant", "lr": -1}}"#,
                "schedule.lr",
            ),
            (r#""decode": {"beam": 0}"#, "decode.beam"),
            (r#""decode": {"temperature": 0}"#, "temperature"),
            (
                r#""train": {"best_metric": "bleu"}"#,
                "best_metric \"bleu\"",
            ),
            (r#""train": {"best_metric": "rouge"}"#, "rougeL"),
        ] {
            let path = write(
                "bad",
                &format!(r#"{{"task": "lm", "data": {{"train": "t", "valid": "v"}}, {text}}}"#),
            );
            let e = Job::load(&path).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("bad.json"), "{want}: {e}");
        }
        let path = write(
            "model",
            r#"{"task": "lm", "data": {"train": "t", "valid": "v"}, "model": {"d_modle": 8}}"#,
        );
        let e = Job::load(&path)
            .unwrap()
            .model_config(None, 10, 0, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d_modle"), "{e}");
    }

    /// Every committed job config loads, its model section builds a model config (unless it
    /// starts from another model), and the data it names is in the repository (a `data/`
    /// path that is not bundled would fail only when a user runs it).
    #[test]
    fn every_committed_config_is_a_job_with_bundled_data() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let job = Job::load(&path).unwrap_or_else(|e| panic!("{e}"));
            // A warm start takes its model from the starting directory (not bundled).
            if job.init_from.is_none() && job.pretrained.is_none() {
                job.model_config(None, 100, 0, 2)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            let files = [&job.data.train, &job.data.valid].into_iter();
            for f in files.chain(job.data.test.as_ref()) {
                // The tweets are not bundled (their license): scripts fetch them.
                let bundled = !f.to_string_lossy().contains("tweets");
                assert!(
                    !bundled || f.exists(),
                    "{}: {}",
                    path.display(),
                    f.display()
                );
            }
            n += 1;
        }
        assert!(n >= 10, "{n} configs in {}", dir.display());
    }
}
