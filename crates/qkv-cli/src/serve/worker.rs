//! The model worker: one thread owns the model (models take `&mut self` and use every core
//! through rayon) and runs dynamic batches. It blocks for a first request, gathers more until the
//! batch window closes or `max_batch` inputs are waiting, groups the requests by what they ask
//! (endpoint, beam, new tokens; each generation row keeps its own sampling settings and
//! seed), runs one batched call per group and answers each request. Requests hold token ids: the
//! handlers tokenized them, and outputs go back as ids.

use super::metrics::Metrics;
use qkv::decode::Choice;
use qkv::mbr::Utility;
use qkv::model::{AnyModel, Decoding, EncoderDecoder, Seq2Seq};
use qkv::model_dir::ModelFiles;
use qkv::tasks::{classify, lm, translate};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What one request asks of the model, as token ids (one row per input text).
#[derive(Debug)]
pub enum Work {
    /// Sources ending in EOS.
    Translate {
        ids: Vec<Vec<u32>>,
        beam: usize,
    },
    Classify {
        ids: Vec<Vec<u32>>,
    },
    Embed {
        ids: Vec<Vec<u32>>,
    },
    /// A prompt after the start token.
    Generate {
        prefix: Vec<u32>,
        max_new: usize,
        choice: Choice,
    },
}

/// Which requests can share one batched call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    Translate { beam: usize },
    Classify,
    Embed,
    Generate { max_new: usize },
}

impl Work {
    /// Inputs this request adds to a batch.
    fn inputs(&self) -> usize {
        match self {
            Work::Translate { ids, .. } | Work::Classify { ids } | Work::Embed { ids } => ids.len(),
            Work::Generate { .. } => 1,
        }
    }

    /// Input tokens (for the metrics).
    pub fn tokens(&self) -> usize {
        match self {
            Work::Translate { ids, .. } | Work::Classify { ids } | Work::Embed { ids } => {
                ids.iter().map(|i| i.len()).sum()
            }
            Work::Generate { prefix, .. } => prefix.len().saturating_sub(1),
        }
    }

    fn group(&self) -> Group {
        match *self {
            Work::Translate { beam, .. } => Group::Translate { beam },
            Work::Classify { .. } => Group::Classify,
            Work::Embed { .. } => Group::Embed,
            Work::Generate { max_new, .. } => Group::Generate { max_new },
        }
    }

    fn rows(&self) -> Vec<Vec<u32>> {
        match self {
            Work::Translate { ids, .. } | Work::Classify { ids } | Work::Embed { ids } => {
                ids.clone()
            }
            Work::Generate { prefix, .. } => vec![prefix.clone()],
        }
    }
}

#[derive(Debug)]
pub enum Reply {
    /// Translations or generations, one per input: (prefix fed, new tokens).
    Texts(Vec<(Vec<u32>, Vec<u32>)>),
    /// Class probabilities or embeddings, one row per input.
    Rows(Vec<Vec<f32>>),
}

pub struct Request {
    pub work: Work,
    pub reply: oneshot::Sender<Result<Reply, String>>,
}

pub struct BatchPolicy {
    /// Inputs per batch at most (1 turns dynamic batching off).
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub window: Duration,
}

/// Serve `model` (a loaded directory's, or its copy on the GPU) with the directory's `files`.
pub fn run<B: Decoding>(
    mut model: AnyModel<B>,
    files: ModelFiles,
    rx: Receiver<Request>,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
) where
    Seq2Seq<B>: EncoderDecoder<B>,
{
    // Translation's per-thread model copies, kept from batch to batch.
    let mut workers = translate::DecodeWorkers::default();
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + policy.window;
        let mut inputs = first.work.inputs();
        let mut requests = vec![first];
        while inputs < policy.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(request) => {
                    inputs += request.work.inputs();
                    requests.push(request);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queued.fetch_sub(requests.len(), Ordering::Relaxed);
        // A request whose client has gone (timed out) is not worth computing.
        requests.retain(|j| !j.reply.is_closed());
        while !requests.is_empty() {
            let key = requests[0].work.group();
            let (group, rest): (Vec<Request>, Vec<Request>) =
                requests.into_iter().partition(|j| j.work.group() == key);
            requests = rest;
            run_group(&mut model, &files, &mut workers, group, &metrics);
        }
    }
}

/// One batched model call for requests of one group; each request gets its slice of the results.
fn run_group<B: Decoding>(
    model: &mut AnyModel<B>,
    files: &ModelFiles,
    workers: &mut translate::DecodeWorkers<Seq2Seq<B>>,
    group: Vec<Request>,
    metrics: &Metrics,
) where
    Seq2Seq<B>: EncoderDecoder<B>,
{
    let counts: Vec<usize> = group.iter().map(|j| j.work.inputs()).collect();
    let total: usize = counts.iter().sum();
    metrics.batch(total);
    let result = call_model(model, files, workers, &group).and_then(|r| {
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
    for (request, n) in group.into_iter().zip(counts) {
        let answer = match &result {
            Ok(Reply::Texts(t)) => Ok(Reply::Texts(t[start..start + n].to_vec())),
            Ok(Reply::Rows(r)) => Ok(Reply::Rows(r[start..start + n].to_vec())),
            Err(e) => Err(e.clone()),
        };
        start += n;
        // The client may have timed out meanwhile: nothing to do then.
        let _ = request.reply.send(answer);
    }
}

/// Input tokens per forward pass when classifying or embedding a group (`qkv classify`'s
/// default `--max-tokens`).
const ENCODER_BATCH_TOKENS: usize = 8192;

fn call_model<B: Decoding>(
    model: &mut AnyModel<B>,
    files: &ModelFiles,
    workers: &mut translate::DecodeWorkers<Seq2Seq<B>>,
    group: &[Request],
) -> Result<Reply, String>
where
    Seq2Seq<B>: EncoderDecoder<B>,
{
    let rows: Vec<Vec<u32>> = group.iter().flat_map(|j| j.work.rows()).collect();
    let (tok, tgt) = (&files.tokenizer, files.target_tokenizer());
    let out = match (&group[0].work, model) {
        (Work::Translate { beam, .. }, AnyModel::Seq2Seq(m)) => {
            let opts = translate::TranslateOptions {
                decode: qkv::decode::DecodeConfig {
                    beam: *beam,
                    ..files.decode.clone()
                },
                nbest: 1,
                // Batches of ~2,048 source tokens: a batch of long inputs splits over the
                // decoding threads.
                max_tokens: 2048,
                // Samples (`decode.sampling`, `decode.mbr_references`) are seeded by a text's
                // index within its request: a request draws what `qkv translate` draws for its
                // texts, whatever other requests share its batch.
                sample_ids: group
                    .iter()
                    .flat_map(|j| 0..j.work.inputs() as u64)
                    .collect(),
            };
            // The model's `decode.mbr` chooses among as many of the request's beam outputs.
            let wide = opts.widened();
            translate::translate_ids_with(m, workers, &rows, tgt.bos, tgt.eos, tgt.pad, &wide)
                .and_then(|hyps| translate::select(hyps, tgt, &opts, Utility::for_task(files.task)))
                .map(|hyps| {
                    Reply::Texts(
                        hyps.into_iter()
                            .map(|mut h| (Vec::new(), h.swap_remove(0).0))
                            .collect(),
                    )
                })
        }
        (Work::Classify { .. }, AnyModel::Classifier(m)) => {
            classify::predict_ids(m, &rows, tok.pad, ENCODER_BATCH_TOKENS).map(Reply::Rows)
        }
        (Work::Embed { .. }, AnyModel::Classifier(m)) => {
            classify::embed_ids(m, &rows, tok.pad, ENCODER_BATCH_TOKENS).map(Reply::Rows)
        }
        (Work::Generate { max_new, .. }, AnyModel::Lm(m)) => {
            let choices: Vec<Choice> = group
                .iter()
                .filter_map(|j| match &j.work {
                    Work::Generate { choice, .. } => Some(choice.clone()),
                    _ => None,
                })
                .collect();
            lm::complete_ids(m, &rows, tok.eos, *max_new, &choices)
                .map(|new| Reply::Texts(rows.into_iter().zip(new).collect()))
        }
        (work, _) => return Err(format!("this model cannot serve {work:?}")),
    };
    out.map_err(|e| e.to_string())
}
