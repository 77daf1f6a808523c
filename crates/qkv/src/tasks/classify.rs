//! Text classification: label vocabulary, tokenized examples, epoch batches and prediction.

use crate::data::{batches_by_tokens, ClassifyBatch, Tokenizer};
use crate::error::{Error, Result};
use crate::kernels::softmax::softmax_forward;
use crate::model::{Classifier, Tokens};

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

/// Each text as the encoder reads it (specials, at most `max_len` ids; never empty).
fn encode_inputs(tok: &Tokenizer, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
    texts
        .iter()
        .map(|t| {
            let mut ids = tok.encode_single(t, max_len)?;
            if ids.is_empty() {
                ids.push(tok.unk.unwrap_or(tok.eos));
            }
            Ok(ids)
        })
        .collect()
}

/// Run `f` on length-bucketed batches of `texts`; it gets the batch and the text index of each
/// of its rows.
fn for_batches(
    tok: &Tokenizer,
    texts: &[String],
    max_len: usize,
    max_tokens: usize,
    mut f: impl FnMut(&ClassifyBatch, &[usize]) -> Result<()>,
) -> Result<()> {
    let encoded = encode_inputs(tok, texts, max_len)?;
    let lengths: Vec<usize> = encoded.iter().map(|e| e.len()).collect();
    for idx in batches_by_tokens(&lengths, max_tokens, 0, 0) {
        let ex: Vec<(&[u32], u32)> = idx.iter().map(|&i| (encoded[i].as_slice(), 0)).collect();
        f(&ClassifyBatch::new(&ex, tok.pad), &idx)?;
    }
    Ok(())
}

/// Class probabilities (N, K) for each text, batched by length.
pub fn predict(
    model: &mut Classifier,
    tok: &Tokenizer,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let k = model.config.n_classes;
    let mut out = vec![Vec::new(); texts.len()];
    for_batches(tok, texts, model.config.max_len, max_tokens, |b, idx| {
        let logits = model.logits(Tokens::new(&b.tokens, b.batch, b.len)?)?;
        let mut probs = logits.to_vec();
        softmax_forward(&mut probs, k);
        for (row, &i) in idx.iter().enumerate() {
            out[i] = probs[row * k..(row + 1) * k].to_vec();
        }
        Ok(())
    })?;
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
    let c = model.config.d_model;
    let mut out = vec![Vec::new(); texts.len()];
    for_batches(tok, texts, model.config.max_len, max_tokens, |b, idx| {
        let features = model.features(Tokens::new(&b.tokens, b.batch, b.len)?)?;
        for (row, &i) in idx.iter().enumerate() {
            out[i] = features[row * c..(row + 1) * c].to_vec();
        }
        Ok(())
    })?;
    Ok(out)
}
