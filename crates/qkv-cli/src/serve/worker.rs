//! The model worker: one thread owns the model (models take `&mut self` and use every core
//! through rayon) and runs dynamic batches. It blocks for a first job, gathers more until the
//! batch window closes or `max_batch` inputs are waiting, groups the jobs by what they ask
//! (endpoint and decoding options), runs one batched call per group and answers each job.

use super::metrics::Metrics;
use crate::eval::{AnyModel, Loaded};
use qkv::decode::{BeamConfig, Choice};
use qkv::tasks::classify::{embed, predict};
use qkv::tasks::lm::complete;
use qkv::tasks::translate::{translate, TranslateOptions};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What one request asks of the model.
#[derive(Debug)]
pub enum Work {
    Translate {
        texts: Vec<String>,
        beam: usize,
    },
    Classify {
        texts: Vec<String>,
    },
    Embed {
        texts: Vec<String>,
    },
    Generate {
        prompt: String,
        max_new: usize,
        choice: Choice,
    },
}

impl Work {
    /// Inputs this job adds to a batch.
    fn inputs(&self) -> usize {
        match self {
            Work::Translate { texts, .. } | Work::Classify { texts } | Work::Embed { texts } => {
                texts.len()
            }
            Work::Generate { .. } => 1,
        }
    }

    /// Jobs with equal keys can share one batched call.
    fn group_key(&self) -> String {
        match self {
            Work::Translate { beam, .. } => format!("translate/{beam}"),
            Work::Classify { .. } => "classify".into(),
            Work::Embed { .. } => "embed".into(),
            Work::Generate {
                max_new, choice, ..
            } => format!("generate/{max_new}/{choice:?}"),
        }
    }
}

#[derive(Debug)]
pub enum Reply {
    /// Translations or generations, one per input.
    Texts(Vec<String>),
    /// Class probabilities or embeddings, one row per input.
    Rows(Vec<Vec<f32>>),
}

pub struct Job {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Reply, String>>,
}

pub struct BatchPolicy {
    /// Inputs per batch at most (1 turns dynamic batching off).
    pub max_batch: usize,
    /// How long the first job of a batch waits for company.
    pub window: Duration,
}

pub fn run(mut loaded: Loaded, rx: Receiver<Job>, policy: BatchPolicy, metrics: Arc<Metrics>) {
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + policy.window;
        let mut inputs = first.work.inputs();
        let mut jobs = vec![first];
        while inputs < policy.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(job) => {
                    inputs += job.work.inputs();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queued.fetch_sub(jobs.len(), Ordering::Relaxed);
        // A job whose client has gone (timed out) is not worth computing.
        jobs.retain(|j| !j.reply.is_closed());
        while !jobs.is_empty() {
            let key = jobs[0].work.group_key();
            let (group, rest): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| j.work.group_key() == key);
            jobs = rest;
            run_group(&mut loaded, group, &metrics);
        }
    }
}

/// One batched model call for jobs of one group; each job gets its slice of the results.
fn run_group(loaded: &mut Loaded, group: Vec<Job>, metrics: &Metrics) {
    let counts: Vec<usize> = group.iter().map(|j| j.work.inputs()).collect();
    let total: usize = counts.iter().sum();
    metrics.batch(total);
    let result = call_model(loaded, &group).and_then(|r| {
        let got = match &r {
            Reply::Texts(t) => t.len(),
            Reply::Rows(rows) => rows.len(),
        };
        if got == total {
            Ok(r)
        } else {
            Err(format!("the model answered {got} of {total} inputs"))
        }
    });
    let mut start = 0;
    for (job, n) in group.into_iter().zip(counts) {
        let answer = match &result {
            Ok(Reply::Texts(t)) => Ok(Reply::Texts(t[start..start + n].to_vec())),
            Ok(Reply::Rows(r)) => Ok(Reply::Rows(r[start..start + n].to_vec())),
            Err(e) => Err(e.clone()),
        };
        start += n;
        // The client may have timed out meanwhile: nothing to do then.
        let _ = job.reply.send(answer);
    }
}

fn call_model(loaded: &mut Loaded, group: &[Job]) -> Result<Reply, String> {
    let texts = || -> Vec<String> {
        group
            .iter()
            .flat_map(|j| match &j.work {
                Work::Translate { texts, .. }
                | Work::Classify { texts }
                | Work::Embed { texts } => texts.clone(),
                Work::Generate { prompt, .. } => vec![prompt.clone()],
            })
            .collect()
    };
    let Loaded {
        model,
        tok,
        tgt_tok,
        ..
    } = loaded;
    let out = match (&group[0].work, model) {
        (Work::Translate { beam, .. }, AnyModel::Seq2Seq(m)) => {
            let opts = TranslateOptions {
                beam: BeamConfig {
                    beam: *beam,
                    ..BeamConfig::default()
                },
                ..TranslateOptions::default()
            };
            translate(m, tok, tgt_tok, &texts(), &opts)
                .map(|hyps| Reply::Texts(hyps.into_iter().map(|mut h| h.swap_remove(0)).collect()))
        }
        (Work::Classify { .. }, AnyModel::Classifier(m)) => {
            predict(m, tok, &texts(), 8192).map(Reply::Rows)
        }
        (Work::Embed { .. }, AnyModel::Classifier(m)) => {
            embed(m, tok, &texts(), 8192).map(Reply::Rows)
        }
        (
            Work::Generate {
                max_new, choice, ..
            },
            AnyModel::Lm(m),
        ) => complete(m, tok, &texts(), *max_new, choice).map(Reply::Texts),
        (work, _) => return Err(format!("this model cannot serve {work:?}")),
    };
    out.map_err(|e| e.to_string())
}
