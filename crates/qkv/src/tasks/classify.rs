//! Text classification: label vocabulary, tokenized examples, epoch batches and prediction.

use crate::data::{batches_by_tokens, ClassifyBatch, Tokenizer};
use crate::error::{Error, Result};
use crate::model::{Classifier, Mode, Tokens};

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

/// Tokenized examples: (tokens truncated to `max_len`, label id).
#[derive(Clone, Debug, Default)]
pub struct LabelledData {
    pub examples: Vec<(Vec<u32>, u32)>,
}

/// Tokenize `(label, text)` pairs; an unknown label is an error naming it and its position.
pub fn encode_labelled(
    tok: &Tokenizer,
    labels: &Labels,
    examples: &[(String, String)],
    max_len: usize,
    what: &str,
) -> Result<LabelledData> {
    let mut out = LabelledData::default();
    for (i, (label, text)) in examples.iter().enumerate() {
        let id = labels.id(label).ok_or_else(|| {
            Error::Config(format!(
                "{what}: example {} has label `{label}`, which the training data does not have (labels: {})",
                i + 1,
                labels.0.join(", ")
            ))
        })?;
        let mut ids = tok.encode_single(text, max_len)?;
        if ids.is_empty() {
            ids.push(tok.unk.unwrap_or(tok.eos));
        }
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

/// Class probabilities (N, K) for each text, batched by length.
pub fn predict(
    model: &mut Classifier,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let max_len = model.config.max_len;
    let k = model.config.n_classes;
    let mut encoded = Vec::with_capacity(texts.len());
    for t in texts {
        let mut ids = tok.encode_single(t, max_len)?;
        if ids.is_empty() {
            ids.push(tok.unk.unwrap_or(tok.eos));
        }
        encoded.push(ids);
    }
    let lengths: Vec<usize> = encoded.iter().map(|e| e.len()).collect();
    let mut out = vec![Vec::new(); texts.len()];
    for idx in batches_by_tokens(&lengths, max_tokens, 0, 0) {
        let ex: Vec<(&[u32], u32)> = idx.iter().map(|&i| (encoded[i].as_slice(), 0)).collect();
        let b = ClassifyBatch::new(&ex, tok.pad);
        let logits = model.forward(Tokens::new(&b.tokens, b.batch, b.len)?, Mode::EVAL)?;
        for (row, &i) in idx.iter().enumerate() {
            let l = &logits[row * k..(row + 1) * k];
            let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = l.iter().map(|&x| (x - max).exp()).collect();
            let s: f32 = e.iter().sum();
            out[i] = e.iter().map(|x| x / s).collect();
        }
    }
    Ok(out)
}

/// Unit-length sentence embeddings (N, C) of each text from a model's pooled encoder states,
/// batched by length.
pub fn embed(
    model: &mut Classifier,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let (max_len, c) = (model.config.max_len, model.config.d_model);
    let mut encoded = Vec::with_capacity(texts.len());
    for t in texts {
        let mut ids = tok.encode_single(t, max_len)?;
        if ids.is_empty() {
            ids.push(tok.unk.unwrap_or(tok.eos));
        }
        encoded.push(ids);
    }
    let lengths: Vec<usize> = encoded.iter().map(|e| e.len()).collect();
    let mut out = vec![Vec::new(); texts.len()];
    for idx in batches_by_tokens(&lengths, max_tokens, 0, 0) {
        let ex: Vec<(&[u32], u32)> = idx.iter().map(|&i| (encoded[i].as_slice(), 0)).collect();
        let b = ClassifyBatch::new(&ex, tok.pad);
        let features = model.features(Tokens::new(&b.tokens, b.batch, b.len)?)?;
        for (row, &i) in idx.iter().enumerate() {
            out[i] = features[row * c..(row + 1) * c].to_vec();
        }
    }
    Ok(out)
}

/// Index of the largest probability.
pub fn argmax(p: &[f32]) -> u32 {
    p.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &v)| if v > a.1 { (i, v) } else { a },
        )
        .0 as u32
}
