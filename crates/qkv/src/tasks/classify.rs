//! Text classification: label vocabulary, tokenized examples, epoch batches, prediction,
//! sentence embeddings and scoring (accuracy, macro-F1, confusion matrix). A pretrained
//! BERT-family encoder can be fine-tuned with a new class head.

use super::{read_pairs, tokenizer_for, Prepared, Report, Task};
use crate::backend::Backend;
use crate::data::{batches_by_tokens, ClassifyBatch, Tokenizer};
use crate::decode::argmax;
use crate::error::{Error, Result};
use crate::hf::HfEncoder;
use crate::job::Job;
use crate::kernels::softmax::softmax_forward;
use crate::metrics::{classification_report, ClassificationReport};
use crate::model::{Classifier, Model, ModelConfig, Tokens};
use crate::model_dir::{ModelFiles, TOKENIZER_FILE};
use crate::train::{loss_tally, Observer, Part, Tally, TrainData};
use std::fmt;
use std::path::Path;

/// Class names in id order (sorted, so the mapping does not depend on file order).
#[derive(Clone, Debug, PartialEq)]
pub struct Labels(pub Vec<String>);

impl Labels {
    pub fn from_examples(examples: &[(String, String)]) -> Self {
        let mut names: Vec<String> = examples.iter().map(|(l, _)| l.clone()).collect();
        names.sort();
        names.dedup();
        Labels(names)
    }
    pub fn id(&self, name: &str) -> Option<u32> {
        self.0.iter().position(|n| n == name).map(|i| i as u32)
    }
}

/// Tokenized examples: (tokens, label id).
#[derive(Clone, Debug, Default)]
pub struct LabelledData {
    pub examples: Vec<(Vec<u32>, u32)>,
    /// Texts longer than the model reads, cut to `max_len` tokens.
    pub cut: usize,
}

/// Tokenize `(label, text)` pairs, cutting (and counting) texts over `max_len` tokens; an
/// unknown label is an error naming it and its position.
pub fn encode_labelled(
    tok: &Tokenizer,
    labels: &Labels,
    examples: &[(String, String)],
    max_len: usize,
    what: &str,
) -> Result<LabelledData> {
    let mut out = LabelledData::default();
    let texts: Vec<String> = examples.iter().map(|(_, t)| t.clone()).collect();
    let ids = encode_texts(tok, &texts, max_len, Some(&mut out.cut))?;
    for (i, ((label, _), ids)) in examples.iter().zip(ids).enumerate() {
        let id = labels.id(label).ok_or_else(|| {
            Error::Config(format!(
                "{what}: example {} has label `{label}`, which the training data does not have (labels: {})",
                i + 1,
                labels.0.join(", ")
            ))
        })?;
        out.examples.push((ids, id));
    }
    Ok(out)
}

impl LabelledData {
    pub fn epoch_batches(
        &self,
        pad: u32,
        max_tokens: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<ClassifyBatch> {
        let lengths: Vec<usize> = self.examples.iter().map(|(t, _)| t.len()).collect();
        batches_by_tokens(&lengths, max_tokens, seed, epoch)
            .into_iter()
            .map(|idx| {
                let ex: Vec<(&[u32], u32)> = idx
                    .iter()
                    .map(|&i| (self.examples[i].0.as_slice(), self.examples[i].1))
                    .collect();
                ClassifyBatch::new(&ex, pad)
            })
            .collect()
    }
}

/// Each text as the encoder reads it (with the tokenizer's specials; never empty). A text
/// over `max_len` tokens is an [`Error::InputTooLong`] naming its index, unless `cut` is
/// given: then it is shortened (as BERT truncates) and counted there.
pub fn encode_texts(
    tok: &Tokenizer,
    texts: &[String],
    max_len: usize,
    mut cut: Option<&mut usize>,
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for (index, text) in texts.iter().enumerate() {
        let mut ids = tok.encode_single(text, usize::MAX)?;
        if ids.len() > max_len {
            match cut.as_deref_mut() {
                Some(n) => {
                    *n += 1;
                    ids = tok.encode_single(text, max_len)?;
                }
                None => {
                    return Err(Error::InputTooLong {
                        index,
                        len: ids.len(),
                        limit: max_len,
                    })
                }
            }
        }
        if ids.is_empty() {
            ids.push(tok.unk.unwrap_or(tok.eos));
        }
        out.push(ids);
    }
    Ok(out)
}

/// Run `f` on length-bucketed batches of `ids`; it gets the batch and the input index of
/// each of its rows.
fn for_batches(
    ids: &[Vec<u32>],
    pad: u32,
    max_tokens: usize,
    mut f: impl FnMut(&ClassifyBatch, &[usize]) -> Result<()>,
) -> Result<()> {
    let lengths: Vec<usize> = ids.iter().map(|e| e.len()).collect();
    for idx in batches_by_tokens(&lengths, max_tokens, 0, 0) {
        let ex: Vec<(&[u32], u32)> = idx.iter().map(|&i| (ids[i].as_slice(), 0)).collect();
        f(&ClassifyBatch::new(&ex, pad), &idx)?;
    }
    Ok(())
}

/// Class probabilities (N, K) of encoded inputs, batched by length.
pub fn predict_ids<B: Backend>(
    model: &mut Classifier<B>,
    ids: &[Vec<u32>],
    pad: u32,
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let (k, be) = (model.config.n_classes, model.backend().clone());
    let mut out = vec![Vec::new(); ids.len()];
    for_batches(ids, pad, max_tokens, |b, idx| {
        let logits = model.logits(Tokens::new(&b.tokens, b.batch, b.len)?)?;
        let mut probs = be.to_host(logits)?.into_owned();
        softmax_forward(&mut probs, k);
        for (row, &i) in idx.iter().enumerate() {
            out[i] = probs[row * k..(row + 1) * k].to_vec();
        }
        Ok(())
    })?;
    Ok(out)
}

/// Unit-length sentence embeddings (N, C) of encoded inputs from the model's pooled encoder
/// states, batched by length.
pub fn embed_ids<B: Backend>(
    model: &mut Classifier<B>,
    ids: &[Vec<u32>],
    pad: u32,
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let c = model.config.d_model;
    let mut out = vec![Vec::new(); ids.len()];
    for_batches(ids, pad, max_tokens, |b, idx| {
        let features = model.features(Tokens::new(&b.tokens, b.batch, b.len)?)?;
        for (row, &i) in idx.iter().enumerate() {
            out[i] = features[row * c..(row + 1) * c].to_vec();
        }
        Ok(())
    })?;
    Ok(out)
}

/// Class probabilities of `texts`; a text longer than the model reads is an error.
pub fn predict<B: Backend>(
    model: &mut Classifier<B>,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let ids = encode_texts(tok, texts, model.config.max_len, None)?;
    predict_ids(model, &ids, tok.pad, max_tokens)
}

/// Sentence embeddings of `texts`. A text longer than the model reads is cut to it and
/// counted in `cut`, as sentence-transformers truncates at `max_seq_length` (the embeddings
/// then match its to 1e-4); without `cut` it is an error naming the text.
pub fn embed<B: Backend>(
    model: &mut Classifier<B>,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
    cut: Option<&mut usize>,
) -> Result<Vec<Vec<f32>>> {
    let ids = encode_texts(tok, texts, model.config.max_len, cut)?;
    embed_ids(model, &ids, tok.pad, max_tokens)
}

/// Accuracy, macro-F1 and the confusion matrix of a model on labelled examples.
#[derive(Clone, Debug)]
pub struct ClassifyReport {
    pub examples: usize,
    pub labels: Labels,
    pub scores: ClassificationReport,
    /// Texts longer than the model reads, cut to its `max_len`.
    pub cut: usize,
}

impl fmt::Display for ClassifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (r, names) = (&self.scores, &self.labels.0);
        writeln!(
            f,
            "{} examples: accuracy {:.2}%, macro-F1 {:.2}%",
            self.examples,
            100.0 * r.accuracy,
            100.0 * r.macro_f1
        )?;
        if self.cut > 0 {
            writeln!(f, "{} texts were cut to the model's length", self.cut)?;
        }
        let width = names.iter().map(|l| l.len()).max().unwrap_or(4).max(6);
        writeln!(f, "confusion (rows: gold, columns: predicted)")?;
        write!(f, "{:>width$}", "")?;
        for l in names {
            write!(f, " {l:>width$}")?;
        }
        write!(f, "  F1")?;
        for (k, row) in r.confusion.iter().enumerate() {
            write!(f, "\n{:>width$}", names[k])?;
            for c in row {
                write!(f, " {c:>width$}")?;
            }
            write!(f, "  {:.3}", r.per_class_f1[k])?;
        }
        Ok(())
    }
}

/// Score `model` on `(label, text)` examples; an unknown label is an error naming it.
pub fn evaluate<B: Backend>(
    model: &mut Classifier<B>,
    tok: &Tokenizer,
    labels: &Labels,
    examples: &[(String, String)],
    max_tokens: usize,
) -> Result<ClassifyReport> {
    let data = encode_labelled(tok, labels, examples, model.config.max_len, "test")?;
    let ids: Vec<Vec<u32>> = data.examples.iter().map(|(t, _)| t.clone()).collect();
    let gold: Vec<u32> = data.examples.iter().map(|(_, l)| *l).collect();
    let probs = predict_ids(model, &ids, tok.pad, max_tokens)?;
    let pred: Vec<u32> = probs.iter().map(|p| argmax(p) as u32).collect();
    Ok(ClassifyReport {
        examples: gold.len(),
        labels: labels.clone(),
        scores: classification_report(&gold, &pred, labels.0.len()),
        cut: data.cut,
    })
}

/// The classify task of a job: labelled training examples, validation (loss and accuracy),
/// test examples, and the pretrained encoder to start from.
pub struct Classify {
    train: LabelledData,
    valid_batches: Vec<ClassifyBatch>,
    valid_ids: Vec<Vec<u32>>,
    valid_gold: Vec<u32>,
    test: Option<Vec<(String, String)>>,
    pretrained: Option<HfEncoder>,
    pad: u32,
    max_tokens: usize,
    seed: u64,
}

impl<B: Backend> TrainData<Classifier<B>, B> for Classify {
    fn epoch(&self, epoch: u64) -> Result<Vec<ClassifyBatch>> {
        Ok(self
            .train
            .epoch_batches(self.pad, self.max_tokens, self.seed, epoch))
    }

    fn validate(&mut self, model: &mut Classifier<B>, part: Part) -> Result<Tally> {
        let mine = part.of(self.valid_ids.len());
        let probs = predict_ids(
            model,
            &self.valid_ids[mine.clone()],
            self.pad,
            self.max_tokens,
        )?;
        let correct = probs
            .iter()
            .zip(&self.valid_gold[mine.clone()])
            .filter(|(p, &gold)| argmax(p) as u32 == gold)
            .count();
        let mut tally = loss_tally(model, &self.valid_batches, part)?;
        tally.metric = Some(("accuracy".into(), 100.0 * correct as f64, mine.len() as f64));
        Ok(tally)
    }
}

impl Task for Classify {
    type Model = Classifier;

    fn prepare(job: &Job, run: &Path, observer: &mut dyn Observer) -> Result<Prepared<Self>> {
        let train_ex = read_pairs(job, &job.data.train, true, observer)?;
        let valid_ex = read_pairs(job, &job.data.valid, true, observer)?;
        let test = job
            .data
            .test
            .as_deref()
            .map(|p| read_pairs(job, p, true, observer))
            .transpose()?;
        let labels = Labels::from_examples(&train_ex);
        if labels.0.len() < 2 {
            return Err(Error::Config(format!(
                "{}: classification needs at least 2 labels, found {:?}",
                job.data.train.display(),
                labels.0
            )));
        }
        let pretrained = job.pretrained.as_deref().map(HfEncoder::open).transpose()?;
        if let Some(enc) = &pretrained {
            observer.on_message(&format!("fine-tuning {}", enc.dir.display()));
        }
        let tok = match &pretrained {
            Some(enc) => enc.tokenizer.clone(),
            None => {
                let texts = || train_ex.iter().map(|(_, t)| t.clone());
                tokenizer_for(job, run, TOKENIZER_FILE, texts, observer)?
            }
        };
        let base = pretrained.as_ref().map(|e| &e.config);
        let config = job.model_config(base, tok.vocab_size(), tok.pad, labels.0.len())?;
        let max_len = config.max_len;
        let train = encode_labelled(&tok, &labels, &train_ex, max_len, "train")?;
        let valid = encode_labelled(&tok, &labels, &valid_ex, max_len, "valid")?;
        if valid.examples.is_empty() || test.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(Error::Config(
                "the validation and test sets must not be empty".into(),
            ));
        }
        observer.on_message(&format!(
            "train: {} examples ({} cut to {max_len} tokens), valid: {}, labels: {}, vocabulary {}",
            train.examples.len(),
            train.cut,
            valid.examples.len(),
            labels.0.join(", "),
            tok.vocab_size()
        ));
        let max_tokens = job.train.max_tokens;
        let task = Classify {
            valid_batches: valid.epoch_batches(tok.pad, max_tokens, 0, 0),
            valid_ids: valid.examples.iter().map(|(t, _)| t.clone()).collect(),
            valid_gold: valid.examples.iter().map(|(_, l)| *l).collect(),
            train,
            test,
            pretrained,
            pad: tok.pad,
            max_tokens,
            seed: job.train.seed,
        };
        let files = ModelFiles {
            tokenizer: tok,
            target_tokenizer: None,
            labels: Some(labels),
            decode: job.decode.clone(),
            task: None,
        };
        Ok(Prepared {
            task,
            files,
            config,
        })
    }

    fn new_model(&self, config: ModelConfig, job: &Job) -> Result<Classifier> {
        let mut model = Classifier::new(config, job.train.seed)?;
        if let Some(enc) = &self.pretrained {
            enc.load_weights(&mut model)?;
        }
        Ok(model)
    }

    fn test(
        &mut self,
        model: &mut Classifier,
        files: &ModelFiles,
        _job: &Job,
    ) -> Result<Option<Report>> {
        let (Some(test), Some(labels)) = (&self.test, &files.labels) else {
            return Ok(None);
        };
        let r = evaluate(model, &files.tokenizer, labels, test, self.max_tokens)?;
        Ok(Some(Report::Classify(r)))
    }
}
