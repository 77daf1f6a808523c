//! The tasks users train: translation ([`translate`]), text classification ([`classify`])
//! and language modelling ([`lm`]); and the copy task ([`copy`]), the Annotated
//! Transformer's first example. Each turns text into model batches, scores a model on
//! held-out data, and turns model outputs back into text or scores. None touches the
//! terminal: progress goes to an [`Observer`], results come back as a [`Report`].

pub mod classify;
pub mod copy;
pub mod lm;
pub mod translate;

use crate::backend::Cuda;
use crate::data::{read_labelled, read_parallel, Tokenizer};
use crate::error::{Error, Result};
use crate::job::Job;
use crate::model::{Model, ModelConfig, ToBackend};
use crate::model_dir::{ModelFiles, TOKENIZER_FILE};
use crate::train::{Observer, TrainData};
use std::path::Path;

/// The model of task `T` on the GPU.
type OnCuda<T> = <<T as Task>::Model as ToBackend>::On<Cuda>;

/// One task's side of a training job: its data for the model on the CPU and on the GPU.
pub trait Task: TrainData<Self::Model> + TrainData<OnCuda<Self>, Cuda> + Sized {
    type Model: Model + ToBackend;

    /// Read the job's data and make the model's files (tokenizers, labels, decoding
    /// defaults) and config. A tokenizer already in `run` (a resumed run's) is reused;
    /// otherwise the job's file is loaded or a BPE vocabulary trained on the data.
    fn prepare(job: &Job, run: &Path, observer: &mut dyn Observer) -> Result<Prepared<Self>>;

    /// A freshly initialised model (or a pretrained one, where the job names it).
    fn new_model(&self, config: ModelConfig, job: &Job) -> Result<Self::Model>;

    /// Score the trained model on the job's test data, if it has any.
    fn test(
        &mut self,
        model: &mut Self::Model,
        files: &ModelFiles,
        job: &Job,
    ) -> Result<Option<Report>>;
}

/// A task ready to train: its data, and what the model directory will hold.
pub struct Prepared<T> {
    pub task: T,
    pub files: ModelFiles,
    pub config: ModelConfig,
}

/// What scoring a model found (and sample outputs), printable as the CLI shows it.
#[allow(clippy::large_enum_variant)] // one per evaluation
#[derive(Clone, Debug)]
pub enum Report {
    Translate(translate::TranslateReport),
    Classify(classify::ClassifyReport),
    Lm(lm::LmReport),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Translate(r) => r.fmt(f),
            Report::Classify(r) => r.fmt(f),
            Report::Lm(r) => r.fmt(f),
        }
    }
}

/// `source<TAB>target` or `label<TAB>text` records of `path`, saying how many malformed
/// lines were skipped (when the job allows skipping).
pub(crate) fn read_pairs(
    job: &Job,
    path: &Path,
    labelled: bool,
    observer: &mut dyn Observer,
) -> Result<Vec<(String, String)>> {
    let r = if labelled {
        read_labelled(path, job.data.skip_malformed)?
    } else {
        read_parallel(path, job.data.skip_malformed)?
    };
    if r.skipped > 0 {
        observer.on_message(&format!(
            "{}: skipped {} malformed lines (first: {})",
            path.display(),
            r.skipped,
            r.first_skipped.unwrap_or_default()
        ));
    }
    Ok(r.records)
}

/// The tokenizer saved as `run/file`: reused when it exists (a resumed run), else the
/// `init_from` model's, else the job's `tokenizer.path`, else a BPE vocabulary trained on
/// `texts`.
pub(crate) fn tokenizer_for<I>(
    job: &Job,
    run: &Path,
    file: &str,
    texts: impl FnOnce() -> I,
    observer: &mut dyn Observer,
) -> Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    let own = run.join(file);
    if own.exists() {
        return Tokenizer::load(&own);
    }
    if let Some(dir) = &job.init_from {
        // A Hugging Face encoder has one vocabulary, in `tokenizer.json`.
        if crate::hf::is_hf_dir(dir) && file != TOKENIZER_FILE {
            return Err(Error::Config(format!(
                "init_from {} has one vocabulary: set tokenizer.joint to true",
                dir.display()
            )));
        }
        return Tokenizer::load(&dir.join(file));
    }
    let spec = &job.tokenizer;
    match &spec.path {
        Some(p) => Tokenizer::load(p),
        None => {
            observer.on_message(&format!(
                "training a BPE tokenizer ({} tokens) for {file}…",
                spec.vocab_size
            ));
            Tokenizer::train_bpe_with(texts(), spec.vocab_size, spec.lowercase, false)
        }
    }
}
