//! A model directory: what it takes to use a trained model, in one folder (as a Hugging Face
//! hub directory). `config.json` and `model.safetensors` (see [`crate::checkpoint`]), the
//! tokenizer (`tokenizer.json`, and `target_tokenizer.json` when a translation model has one
//! vocabulary per side), the class names (`labels.json`), the decoding defaults
//! (`decode.json`), the task when its family has several (`task.json`: a summarizer) and, in a
//! training checkpoint, how it was trained (`train_config.json`).
//!
//! This is the one place that reads or writes those files and the one place that decides a
//! model's family from its config; a Hugging Face BERT-family directory loads as an encoder.

use crate::checkpoint::{self, io_err, json_err, write_atomic};
use crate::data::Tokenizer;
use crate::decode::DecodeConfig;
use crate::error::{Error, Result};
use crate::job::TaskKind;
use crate::model::{AnyModel, Ensemble, Family};
use crate::tasks::classify::Labels;
use crate::train::{load_train_config, TrainConfig, TRAIN_CONFIG_FILE};
use std::path::{Path, PathBuf};

pub use crate::checkpoint::{CONFIG_FILE, MODEL_FILE};
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The target side's vocabulary when a translation model has one per side.
pub const TARGET_TOKENIZER_FILE: &str = "target_tokenizer.json";
pub const LABELS_FILE: &str = "labels.json";
pub const DECODE_FILE: &str = "decode.json";
/// The task a model was trained for, when its family has several (`"summarize"`).
pub const TASK_FILE: &str = "task.json";

/// A model directory's files besides its weights and config.
#[derive(Clone)]
pub struct ModelFiles {
    pub tokenizer: Tokenizer,
    /// A translation model's target vocabulary, when it is not `tokenizer`.
    pub target_tokenizer: Option<Tokenizer>,
    /// Classifiers: class names in id order.
    pub labels: Option<Labels>,
    pub decode: DecodeConfig,
    /// The task, when it is not the family's first (a Seq2Seq model that summarizes).
    pub task: Option<TaskKind>,
}

impl ModelFiles {
    /// The tokenizer of the output side (translation targets; otherwise the one tokenizer).
    pub fn target_tokenizer(&self) -> &Tokenizer {
        self.target_tokenizer.as_ref().unwrap_or(&self.tokenizer)
    }

    /// Write the files into `dir` (which exists); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut paths = vec![dir.join(TOKENIZER_FILE), dir.join(DECODE_FILE)];
        self.tokenizer.save(&paths[0])?;
        let decode = serde_json::to_string_pretty(&self.decode).map_err(|e| json_err(dir, e))?;
        write_atomic(&paths[1], decode.as_bytes())?;
        if let Some(t) = &self.target_tokenizer {
            let path = dir.join(TARGET_TOKENIZER_FILE);
            t.save(&path)?;
            paths.push(path);
        }
        if let Some(task) = self.task {
            let path = dir.join(TASK_FILE);
            let json = serde_json::to_string(&task).map_err(|e| json_err(dir, e))?;
            write_atomic(&path, json.as_bytes())?;
            paths.push(path);
        }
        if let Some(labels) = &self.labels {
            let path = dir.join(LABELS_FILE);
            let json = serde_json::to_string_pretty(&labels.0).map_err(|e| json_err(dir, e))?;
            write_atomic(&path, json.as_bytes())?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// Read the files of a qkv model directory whose model has `n_classes` classes.
    fn read(dir: &Path, pad_id: u32, n_classes: usize) -> Result<Self> {
        let tokenizer = Tokenizer::load(&dir.join(TOKENIZER_FILE))?;
        if tokenizer.pad != pad_id {
            return Err(file_err(
                &dir.join(TOKENIZER_FILE),
                format!(
                    "the tokenizer pads with id {} but the model with {pad_id}",
                    tokenizer.pad
                ),
            ));
        }
        let tgt_path = dir.join(TARGET_TOKENIZER_FILE);
        let target_tokenizer = if tgt_path.exists() {
            let t = Tokenizer::load(&tgt_path)?;
            crate::tasks::translate::check_specials(&tokenizer, &t)?;
            Some(t)
        } else {
            None
        };
        let labels = if n_classes > 0 {
            Some(read_labels(&dir.join(LABELS_FILE), n_classes)?)
        } else {
            None
        };
        // Directories written before decoding defaults were saved decode with the defaults.
        let decode_path = dir.join(DECODE_FILE);
        let decode = if decode_path.exists() {
            let text = std::fs::read_to_string(&decode_path).map_err(io_err(&decode_path))?;
            let d: DecodeConfig = serde_json::from_str(&text)
                .map_err(|e| file_err(&decode_path, format!("invalid decoding settings: {e}")))?;
            d.validate()
                .map_err(|e| file_err(&decode_path, e.to_string()))?;
            d
        } else {
            DecodeConfig::default()
        };
        let task_path = dir.join(TASK_FILE);
        let task = if task_path.exists() {
            let text = std::fs::read_to_string(&task_path).map_err(io_err(&task_path))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| file_err(&task_path, format!("invalid task: {e}")))?,
            )
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            target_tokenizer,
            labels,
            decode,
            task,
        })
    }
}

fn file_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn read_labels(path: &Path, n_classes: usize) -> Result<Labels> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let names: Vec<String> = serde_json::from_str(&text)
        .map_err(|e| file_err(path, format!("expected a JSON list of label names ({e})")))?;
    if names.len() != n_classes {
        return Err(file_err(
            path,
            format!(
                "{} labels for a model with {n_classes} classes",
                names.len()
            ),
        ));
    }
    Ok(Labels(names))
}

/// A loaded model directory.
pub struct ModelDir {
    pub model: AnyModel,
    pub files: ModelFiles,
    /// How the model was trained, when the directory is a qkv training checkpoint.
    pub train_config: Option<TrainConfig>,
}

impl ModelDir {
    /// Load a qkv model directory, or a Hugging Face BERT-family encoder (an embedding
    /// model).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(file_err(dir, "not a model directory"));
        }
        if crate::hf::is_hf_dir(dir) {
            let enc = crate::hf::HfEncoder::open(dir)?;
            let model = AnyModel::Classifier(enc.embedding_model()?);
            return Ok(Self {
                model,
                files: ModelFiles {
                    tokenizer: enc.tokenizer,
                    target_tokenizer: None,
                    labels: None,
                    decode: DecodeConfig::default(),
                    task: None,
                },
                train_config: None,
            });
        }
        if !dir.join(CONFIG_FILE).is_file() {
            return Err(file_err(
                dir,
                format!(
                    "not a model directory: it has no {CONFIG_FILE} (a trained model's \
                     directory, such as a run's best/ or a checkpoint-N/, holds {CONFIG_FILE}, \
                     {MODEL_FILE} and {TOKENIZER_FILE})"
                ),
            ));
        }
        let cfg = checkpoint::load_config(dir)?;
        let files = ModelFiles::read(dir, cfg.pad_id, cfg.n_classes)?;
        let mut model = AnyModel::new(cfg.clone(), 0)?;
        checkpoint::load(dir, &cfg, model.params_mut())?;
        let train_config = if dir.join(TRAIN_CONFIG_FILE).exists() {
            Some(load_train_config(dir)?)
        } else {
            None
        };
        Ok(Self {
            model,
            files,
            train_config,
        })
    }

    /// Write config, weights and files into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save(dir, self.model.config(), self.model.params(), None)?;
        self.files.write(dir)?;
        Ok(())
    }

    pub fn family(&self) -> Family {
        self.model.config().family
    }
}

/// Translation (or summarization) model directories as one [`Ensemble`] (fairseq's
/// `--path a.pt:b.pt`), with the files of the first (its decoding defaults and tokenizers).
/// Every model must be a Seq2Seq model with the first's tokenizers and task; an error names
/// the directory that is not.
pub fn ensemble(dirs: Vec<(PathBuf, ModelDir)>) -> Result<(Ensemble, ModelFiles)> {
    let mut models = Vec::with_capacity(dirs.len());
    let mut first: Option<(PathBuf, ModelFiles)> = None;
    for (path, dir) in dirs {
        let AnyModel::Seq2Seq(model) = dir.model else {
            return Err(file_err(
                &path,
                format!(
                    "an ensemble takes translation or summarization models, not a {:?} model",
                    dir.model.config().family
                ),
            ));
        };
        if let Some((first_path, files)) = &first {
            let same_side = |a: &Option<Tokenizer>, b: &Option<Tokenizer>| match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_as(b),
                _ => false,
            };
            if !files.tokenizer.same_as(&dir.files.tokenizer)
                || !same_side(&files.target_tokenizer, &dir.files.target_tokenizer)
            {
                return Err(file_err(
                    &path,
                    format!(
                        "its tokenizer differs from {}'s; an ensemble's models share their \
                         vocabularies",
                        first_path.display()
                    ),
                ));
            }
            if files.task != dir.files.task {
                return Err(file_err(
                    &path,
                    format!(
                        "a {} model, where {} is a {} model",
                        task_name(dir.files.task),
                        first_path.display(),
                        task_name(files.task)
                    ),
                ));
            }
        } else {
            first = Some((path, dir.files));
        }
        models.push(model);
    }
    let Some((_, files)) = first else {
        return Err(Error::Usage("an ensemble needs at least one model".into()));
    };
    Ok((Ensemble::new(models)?, files))
}

fn task_name(task: Option<TaskKind>) -> &'static str {
    match task {
        Some(TaskKind::Summarize) => "summarization",
        _ => "translation",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn dir(family: Family, text: &str, task: Option<TaskKind>) -> ModelDir {
        let tokenizer = Tokenizer::train_bpe([text].iter(), 40, false).unwrap();
        let cfg = ModelConfig::preset("tiny", family, tokenizer.vocab_size()).unwrap();
        ModelDir {
            model: AnyModel::new(cfg, 1).unwrap(),
            files: ModelFiles {
                tokenizer,
                target_tokenizer: None,
                labels: None,
                decode: DecodeConfig::default(),
                task,
            },
            train_config: None,
        }
    }

    /// Models that cannot decode together are errors naming the directory that does not fit.
    #[test]
    fn an_ensemble_takes_seq2seq_models_with_one_vocabulary_and_task() {
        let text = "the king went to the house of god";
        let seq2seq = || dir(Family::Seq2seq, text, None);
        let named = |dirs: Vec<ModelDir>| {
            let paths = ["a", "b", "c"].map(PathBuf::from);
            paths.into_iter().zip(dirs).collect::<Vec<_>>()
        };
        let (ens, _) = ensemble(named(vec![seq2seq(), seq2seq(), seq2seq()])).unwrap();
        assert_eq!(ens.models.len(), 3);
        let cases = [
            (
                vec![seq2seq(), dir(Family::Classifier, text, None)],
                "b: an ensemble takes translation or summarization models",
            ),
            (
                vec![
                    seq2seq(),
                    seq2seq(),
                    dir(Family::Seq2seq, "a b c d e f", None),
                ],
                "c: its tokenizer differs from a's",
            ),
            (
                vec![
                    seq2seq(),
                    dir(Family::Seq2seq, text, Some(TaskKind::Summarize)),
                ],
                "b: a summarization model, where a is a translation model",
            ),
        ];
        for (dirs, want) in cases {
            let err = ensemble(named(dirs)).err().unwrap().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    /// A directory that is not a model (a run directory, a typo'd parent) says which file
    /// is missing and what a model directory holds.
    #[test]
    fn a_directory_without_a_config_is_not_a_model() {
        let run = std::env::temp_dir().join(format!("qkv-model-dir-{}", std::process::id()));
        std::fs::create_dir_all(&run).unwrap();
        let err = ModelDir::load(&run).err().unwrap().to_string();
        std::fs::remove_dir_all(&run).unwrap();
        assert!(err.starts_with(&run.display().to_string()), "{err}");
        assert!(
            err.contains("not a model directory: it has no config.json"),
            "{err}"
        );
        assert!(err.contains("best/"), "{err}");
    }
}
