//! A job from files to a scored model, and a model directory scored on a test file: what
//! `qkv train` and `qkv eval` run. Read the data and make the tokenizer (the task's
//! `prepare`), build the model, train it with checkpoints in the run directory, reload the
//! best checkpoint and score it on the test set.
//!
//! Data parallel ([`train_with`]): rank 0 prepares the run directory and sends its files
//! (tokenizers, labels) to the other ranks, which prepare the same data from a private copy;
//! only rank 0 writes into the run directory, so it need not be on a shared filesystem.

use crate::backend::{Backend, Cuda, Device};
use crate::data::{read_labelled, read_parallel, read_text};
use crate::decode::DecodeConfig;
use crate::dist::{Collective, Solo};
use crate::error::{Error, Result};
use crate::job::{Job, TaskKind};
use crate::kernels::matmul::Precision;
use crate::model::{AnyModel, Decoding, EncoderDecoder, Model, ToBackend};
use crate::model_dir::{ModelDir, ModelFiles};
use crate::tasks::classify::{self, Classify};
use crate::tasks::lm::{self, Lm};
use crate::tasks::translate::{self, Summarize, Translate, TranslateOptions};
use crate::tasks::{Prepared, Report, Task};
use crate::train::{
    Observer, Outcome, RunDir, TrainData, Trainer, TrainerState, BEST_DIR, METRICS_FILE,
};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// How a training job went.
#[derive(Debug)]
pub struct TrainReport {
    pub outcome: Outcome,
    pub state: TrainerState,
    /// `max_steps`, or the horizon fitted to the time limit.
    pub last_step: u64,
    pub parameters: usize,
    pub best: PathBuf,
    /// The best checkpoint on the test set (none without test data, or when interrupted).
    pub test: Option<Report>,
}

/// Train `job` in its run directory: a fresh run (refusing a directory that holds one), or
/// with `resume` continued from its latest checkpoint. Progress goes to `observer`. On
/// `train.device` cuda the model trains and validates on the GPU (a decoding metric decodes
/// there too); the checkpoints' files and the test score are the CPU's.
pub fn train(job: &Job, resume: bool, observer: &mut dyn Observer) -> Result<TrainReport> {
    train_with(job, resume, observer, Rc::new(Solo))
}

/// [`train`] as one of the ranks of `comm` (every rank calls it with the same job). Rank 0
/// reports the run; the other ranks' reports have no test score.
pub fn train_with(
    job: &Job,
    resume: bool,
    observer: &mut dyn Observer,
    comm: Rc<dyn Collective>,
) -> Result<TrainReport> {
    // The device first: a run that cannot start leaves no files behind.
    let cuda = match job.train.device {
        Device::Cpu => None,
        Device::Cuda if comm.size() > 1 => {
            return Err(Error::Config(
                "train.device cuda trains on one GPU; data-parallel training (mpirun) runs on \
                 CPUs"
                    .into(),
            ))
        }
        Device::Cuda => Some(
            Cuda::first_gpu(job.train.precision == Precision::Bf16)
                .map_err(|e| Error::Config(format!("train.device cuda: {e}")))?,
        ),
    };
    let out = job.out();
    if comm.is_root() {
        // A fresh run never mixes with (or prunes) an earlier run's checkpoints and metrics.
        if !resume && (out.join(METRICS_FILE).exists() || out.join(BEST_DIR).exists()) {
            return Err(Error::Config(format!(
                "{} already holds a run: pass --resume to continue it, or --out DIR (or remove it) to start anew",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(crate::checkpoint::io_err(out))?;
    }
    match job.task {
        TaskKind::Translate => run::<Translate>(job, resume, observer, comm, cuda),
        TaskKind::Classify => run::<Classify>(job, resume, observer, comm, cuda),
        TaskKind::Lm => run::<Lm>(job, resume, observer, comm, cuda),
        TaskKind::Summarize => run::<Summarize>(job, resume, observer, comm, cuda),
    }
}

/// The prepared task and, on rank 0, the run directory.
fn prepare<T: Task>(
    job: &Job,
    observer: &mut dyn Observer,
    comm: &dyn Collective,
) -> Result<(Prepared<T>, Option<RunDir>)> {
    let path = job.out().to_path_buf();
    if comm.is_root() {
        let prepared = T::prepare(job, &path, observer)?;
        let extra_files = prepared.files.write(&path)?;
        if comm.size() > 1 {
            send_files(comm, &extra_files)?;
        }
        let run = RunDir { path, extra_files };
        run.restore_interrupted()?;
        return Ok((prepared, Some(run)));
    }
    let copy = PrivateDir::new(comm.rank())?;
    receive_files(comm, &copy.0)?;
    Ok((T::prepare(job, &copy.0, &mut ())?, None))
}

/// Rank 0's prepared files, framed as (name length, name, size, bytes) each.
fn send_files(comm: &dyn Collective, files: &[PathBuf]) -> Result<()> {
    let mut bytes = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let data = std::fs::read(f).map_err(crate::checkpoint::io_err(f))?;
        for part in [name.as_bytes(), &data] {
            bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
            bytes.extend_from_slice(part);
        }
    }
    comm.broadcast_bytes(&mut bytes, "sending the run's tokenizer files")
}

fn receive_files(comm: &dyn Collective, dir: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    comm.broadcast_bytes(&mut bytes, "sending the run's tokenizer files")?;
    let bad = || Error::Distributed("rank 0 sent malformed run files".into());
    fn take<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, tail) = rest.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
        let part = tail.get(..len)?;
        *rest = &tail[len..];
        Some(part)
    }
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let name = take(&mut rest).ok_or_else(bad)?;
        let data = take(&mut rest).ok_or_else(bad)?;
        let name = std::str::from_utf8(name).map_err(|_| bad())?;
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            return Err(bad());
        }
        let path = dir.join(name);
        std::fs::write(&path, data).map_err(crate::checkpoint::io_err(&path))?;
    }
    Ok(())
}

/// A directory of this process's own, removed when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(rank: usize) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("qkv-rank{rank}-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(crate::checkpoint::io_err(&path))?;
        Ok(Self(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run<T: Task>(
    job: &Job,
    resume: bool,
    observer: &mut dyn Observer,
    comm: Rc<dyn Collective>,
    cuda: Option<Cuda>,
) -> Result<TrainReport> {
    let (mut prepared, run) = prepare::<T>(job, observer, &*comm)?;
    let mut model = prepared.task.new_model(prepared.config.clone(), job)?;
    let latest = match (&run, resume) {
        (Some(run), true) => run.latest()?,
        _ => None,
    };
    // A warm start begins the run (a resumed one continues from its checkpoint); rank 0's
    // parameters reach the other ranks when training starts.
    if let (Some(dir), None, true) = (&job.init_from, &latest, comm.is_root()) {
        if crate::hf::is_hf_dir(dir) {
            let enc = crate::hf::HfEncoder::open(dir)?;
            let (copied, total) = enc.init_seq2seq(model.params_mut())?;
            observer.on_message(&format!(
                "initialised {copied} of the model's {total} tensors from the pretrained encoder {} (its cross-attention starts from scratch)",
                dir.display()
            ));
        } else {
            let (copied, total, unused) = crate::checkpoint::init_from(dir, model.params_mut())?;
            observer.on_message(&format!(
                "initialised {copied} of the model's {total} tensors from {} ({unused} of its tensors unused)",
                dir.display()
            ));
        }
    }
    let best = job.out().join(BEST_DIR);
    let root = comm.is_root();
    let start = Start {
        job,
        run,
        latest,
        resume,
        comm: &comm,
    };
    let (trained, mut model) = match cuda {
        None => train_on(model, &mut prepared.task, start, observer)?,
        Some(be) => {
            observer.on_message(&format!("training on {be:?}"));
            let twin = model.to_backend(be)?;
            let (trained, _) = train_on(twin, &mut prepared.task, start, observer)?;
            (trained, model)
        }
    };
    let mut report = TrainReport {
        outcome: trained.outcome,
        last_step: trained.last_step,
        state: trained.state,
        parameters: model.params().len(),
        best: best.clone(),
        test: None,
    };
    if report.outcome == Outcome::Interrupted || !root {
        return Ok(report);
    }
    crate::checkpoint::load(&best, &prepared.config, model.params_mut())?;
    report.test = prepared.task.test(&mut model, &prepared.files, job)?;
    if let Some(Report::Translate(r)) = &report.test {
        let hyp = job.out().join("test.hyp");
        std::fs::write(&hyp, r.hypotheses.join("\n") + "\n")
            .map_err(crate::checkpoint::io_err(&hyp))?;
    }
    Ok(report)
}

/// Where a run starts: its job, run directory (rank 0's), the checkpoint it resumes from.
struct Start<'a> {
    job: &'a Job,
    run: Option<RunDir>,
    latest: Option<PathBuf>,
    resume: bool,
    comm: &'a Rc<dyn Collective>,
}

/// How [`train_on`] ended.
struct Trained {
    outcome: Outcome,
    state: TrainerState,
    last_step: u64,
}

/// Train `model` (on its backend) on `data` from `start`; returns the trained model.
fn train_on<B: Backend, M: Model<B>>(
    model: M,
    data: &mut dyn TrainData<M, B>,
    start: Start<'_>,
    observer: &mut dyn Observer,
) -> Result<(Trained, M)> {
    let Start {
        job,
        run,
        latest,
        resume,
        comm,
    } = start;
    let mut trainer = Trainer::new(model, job.train.clone(), run)?.with_collective(Rc::clone(comm));
    match latest {
        Some(dir) => {
            trainer.resume_from(&dir)?;
            observer.on_message(&format!(
                "resuming from {} (step {})",
                dir.display(),
                trainer.state.step
            ));
        }
        None if resume && comm.is_root() => observer.on_message(&format!(
            "no checkpoint in {} yet; starting fresh",
            job.out().display()
        )),
        None => {}
    }
    observer.on_message(&format!(
        "model: {} parameters; training for at most {} updates",
        trainer.model.params().len(),
        job.train.max_steps
    ));
    if comm.size() > 1 {
        observer.on_message(&format!(
            "data parallel: {} ranks, each batch split across them by target tokens",
            comm.size()
        ));
    }
    let outcome = trainer.fit(data, observer)?;
    let trained = Trained {
        outcome,
        state: trainer.state.clone(),
        last_step: trainer.last_step(),
    };
    Ok((trained, trainer.model))
}

/// Score a translation or summarization model (or an [`crate::model::Ensemble`] of them) on
/// `source<TAB>target` pairs, as [`evaluate`] does.
pub fn evaluate_translation<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    files: &ModelFiles,
    data: &Path,
    decode: Option<&DecodeConfig>,
    max_tokens: usize,
) -> Result<Report> {
    let pairs = read_parallel(data, false)?.records;
    something_to_score(data, pairs.is_empty(), "`source<TAB>target` pairs")?;
    let opts = TranslateOptions {
        max_tokens,
        ..TranslateOptions::new(decode.unwrap_or(&files.decode))
    };
    let report = translate::evaluate(model, files, &pairs, &opts, 0)?;
    Ok(Report::Translate(report))
}

/// A test file without a record to score is an error naming it, not a score of nothing.
fn something_to_score(path: &Path, empty: bool, what: &str) -> Result<()> {
    if empty {
        return Err(Error::File {
            path: path.to_path_buf(),
            msg: format!("no {what} to evaluate (the file is empty or blank)"),
        });
    }
    Ok(())
}

/// Score a model directory on a test file: `source<TAB>target` pairs (translation: BLEU,
/// chrF), `label<TAB>text` examples (classification: accuracy, macro-F1) or text (language
/// model: perplexity, bits per character). `decode` overrides the model's own decoding
/// defaults.
pub fn evaluate(
    dir: &mut ModelDir,
    data: &Path,
    decode: Option<&DecodeConfig>,
    max_tokens: usize,
) -> Result<Report> {
    evaluate_on(dir, data, decode, max_tokens, Device::Cpu)
}

/// [`evaluate`] on `device`: on the GPU the model's copy there scores (in the calling thread's
/// product precision: bf16, else TF32), translation and summarization decoding there too.
pub fn evaluate_on(
    dir: &mut ModelDir,
    data: &Path,
    decode: Option<&DecodeConfig>,
    max_tokens: usize,
    device: Device,
) -> Result<Report> {
    let files = &dir.files;
    let cuda = || {
        let bf16 = crate::kernels::matmul::matmul_precision() == Precision::Bf16;
        Cuda::first_gpu(bf16).map_err(|e| Error::Config(format!("--device cuda: {e}")))
    };
    match (&mut dir.model, device) {
        (AnyModel::Seq2Seq(m), Device::Cpu) => {
            evaluate_translation(m, files, data, decode, max_tokens)
        }
        (AnyModel::Seq2Seq(m), Device::Cuda) => {
            let mut twin = m.to_backend(cuda()?)?;
            evaluate_translation(&mut twin, files, data, decode, max_tokens)
        }
        (AnyModel::Classifier(m), device) => {
            let labels = files.labels.as_ref().ok_or_else(|| {
                Error::Config("this model has no class labels (an embedding model)".into())
            })?;
            let examples = read_labelled(data, false)?.records;
            something_to_score(data, examples.is_empty(), "`label<TAB>text` examples")?;
            let tok = &files.tokenizer;
            let r = match device {
                Device::Cpu => classify::evaluate(m, tok, labels, &examples, max_tokens)?,
                Device::Cuda => {
                    let mut twin = m.to_backend(cuda()?)?;
                    classify::evaluate(&mut twin, tok, labels, &examples, max_tokens)?
                }
            };
            Ok(Report::Classify(r))
        }
        (AnyModel::Lm(m), device) => {
            let text = read_text(data)?;
            something_to_score(data, text.trim().is_empty(), "text")?;
            let tok = &files.tokenizer;
            let r = match device {
                Device::Cpu => lm::evaluate(m, tok, &text, data, max_tokens)?,
                Device::Cuda => {
                    let mut twin = m.to_backend(cuda()?)?;
                    lm::evaluate(&mut twin, tok, &text, data, max_tokens)?
                }
            };
            Ok(Report::Lm(r))
        }
    }
}
