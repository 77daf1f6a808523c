//! A job from files to a scored model, and a model directory scored on a test file: what
//! `qkv train` and `qkv eval` run. Read the data and make the tokenizer (the task's
//! `prepare`), build the model, train it with checkpoints in the run directory, reload the
//! best checkpoint and score it on the test set.

use crate::data::{read_labelled, read_parallel, read_text};
use crate::decode::DecodeConfig;
use crate::error::{Error, Result};
use crate::job::{Job, TaskKind};
use crate::model::{AnyModel, Model};
use crate::model_dir::ModelDir;
use crate::tasks::classify::{self, Classify};
use crate::tasks::lm::{self, Lm};
use crate::tasks::translate::{self, Translate, TranslateOptions};
use crate::tasks::{Report, Task};
use crate::train::{Observer, Outcome, RunDir, Trainer, TrainerState, BEST_DIR, METRICS_FILE};
use std::path::{Path, PathBuf};

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
/// with `resume` continued from its latest checkpoint. Progress goes to `observer`.
pub fn train(job: &Job, resume: bool, observer: &mut dyn Observer) -> Result<TrainReport> {
    let out = job.out();
    // A fresh run never mixes with (or prunes) an earlier run's checkpoints and metrics.
    if !resume && (out.join(METRICS_FILE).exists() || out.join(BEST_DIR).exists()) {
        return Err(Error::Config(format!(
            "{} already holds a run: pass --resume to continue it, or --out DIR (or remove it) to start anew",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(crate::checkpoint::io_err(out))?;
    match job.task {
        TaskKind::Translate => run::<Translate>(job, resume, observer),
        TaskKind::Classify => run::<Classify>(job, resume, observer),
        TaskKind::Lm => run::<Lm>(job, resume, observer),
    }
}

fn run<T: Task>(job: &Job, resume: bool, observer: &mut dyn Observer) -> Result<TrainReport> {
    let path = job.out().to_path_buf();
    let mut prepared = T::prepare(job, &path, observer)?;
    let extra_files = prepared.files.write(&path)?;
    let model = prepared.task.new_model(prepared.config.clone(), job)?;
    let run = RunDir { path, extra_files };
    let latest = if resume { run.latest()? } else { None };
    let best = run.best();
    let mut trainer = Trainer::new(model, job.train.clone(), Some(run))?;
    match latest {
        Some(dir) => {
            trainer.resume_from(&dir)?;
            observer.on_message(&format!(
                "resuming from {} (step {})",
                dir.display(),
                trainer.state.step
            ));
        }
        None if resume => observer.on_message(&format!(
            "no checkpoint in {} yet; starting fresh",
            best.parent().unwrap_or(Path::new(".")).display()
        )),
        None => {}
    }
    observer.on_message(&format!(
        "model: {} parameters; training for at most {} updates",
        trainer.model.params().len(),
        job.train.max_steps
    ));
    let outcome = trainer.fit(&mut prepared.task, observer)?;
    let mut report = TrainReport {
        outcome,
        last_step: trainer.last_step(),
        state: trainer.state.clone(),
        parameters: trainer.model.params().len(),
        best: best.clone(),
        test: None,
    };
    if report.outcome == Outcome::Interrupted {
        return Ok(report);
    }
    let mut model = trainer.model;
    crate::checkpoint::load(&best, &prepared.config, model.params_mut())?;
    report.test = prepared.task.test(&mut model, &prepared.files, job)?;
    if let Some(Report::Translate(r)) = &report.test {
        let hyp = job.out().join("test.hyp");
        std::fs::write(&hyp, r.hypotheses.join("\n") + "\n")
            .map_err(crate::checkpoint::io_err(&hyp))?;
    }
    Ok(report)
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
    let files = &dir.files;
    match &mut dir.model {
        AnyModel::Seq2Seq(m) => {
            let pairs = read_parallel(data, false)?.records;
            let opts = TranslateOptions {
                max_tokens,
                ..TranslateOptions::new(decode.unwrap_or(&files.decode))
            };
            Ok(Report::Translate(translate::evaluate(
                m, files, &pairs, &opts, 0,
            )?))
        }
        AnyModel::Classifier(m) => {
            let labels = files.labels.as_ref().ok_or_else(|| {
                Error::Config("this model has no class labels (an embedding model)".into())
            })?;
            let examples = read_labelled(data, false)?.records;
            let r = classify::evaluate(m, &files.tokenizer, labels, &examples, max_tokens)?;
            Ok(Report::Classify(r))
        }
        AnyModel::Lm(m) => {
            let text = read_text(data)?;
            Ok(Report::Lm(lm::evaluate(
                m,
                &files.tokenizer,
                &text,
                max_tokens,
            )?))
        }
    }
}
