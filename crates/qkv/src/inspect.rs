//! Attention maps of one input, for visualisation (`qkv attention`): the weights of every
//! layer and head, for each attention the model has — encoder self-attention (Figure 1, left),
//! decoder masked self-attention and encoder–decoder cross-attention (Figure 1, right).
//!
//! Layers record their weights only while asked (`record_weights`), which makes them run the
//! materialized kernel for that forward; the flags are cleared again before returning.

use crate::error::Result;
use crate::model::stack::Stack;
use crate::model::{Classifier, LanguageModel, Seq2Seq, Tokens};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    /// Encoder self-attention: source × source.
    EncoderSelf,
    /// Decoder masked self-attention: target × target (or the LM's tokens).
    DecoderSelf,
    /// Cross-attention: target × source.
    Cross,
}

/// One layer's weights for one kind: (H, Tq, Tk), each row summing to 1.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttentionMap {
    pub kind: MapKind,
    pub layer: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub weights: Vec<f32>,
}

impl AttentionMap {
    /// Head `h`'s (Tq, Tk) weights.
    pub fn head(&self, h: usize) -> &[f32] {
        let n = self.queries * self.keys;
        &self.weights[h * n..(h + 1) * n]
    }
}

fn map(kind: MapKind, layer: usize, heads: usize, tq: usize, tk: usize, w: &[f32]) -> AttentionMap {
    AttentionMap {
        kind,
        layer,
        heads,
        queries: tq,
        keys: tk,
        weights: w[..heads * tq * tk].to_vec(),
    }
}

/// Encoder self-attention, decoder self-attention and cross-attention maps of one pair:
/// `src` (S) and the decoder input `tgt_in` (T, starting with BOS).
pub fn seq2seq_maps(model: &mut Seq2Seq, src: &[u32], tgt_in: &[u32]) -> Result<Vec<AttentionMap>> {
    let h = model.config.n_heads;
    set_seq2seq(model, true);
    let run = model
        .logits(
            Tokens::new(src, 1, src.len())?,
            Tokens::new(tgt_in, 1, tgt_in.len())?,
        )
        .map(|_| ());
    let mut maps = Vec::new();
    if run.is_ok() {
        let (s, t) = (src.len(), tgt_in.len());
        maps = collect(&model.encoder, MapKind::EncoderSelf, h, s);
        for (i, l) in model.decoder.layers.iter().enumerate() {
            if let Some(w) = l.self_attn.weights() {
                maps.push(map(MapKind::DecoderSelf, i, h, t, t, w));
            }
            if let Some(w) = l.cross.as_ref().and_then(|c| c.attn.weights()) {
                maps.push(map(MapKind::Cross, i, h, t, s, w));
            }
        }
    }
    set_seq2seq(model, false);
    run?;
    Ok(maps)
}

fn set_seq2seq(model: &mut Seq2Seq, on: bool) {
    record(&mut model.encoder, on);
    record(&mut model.decoder, on);
}

/// Encoder self-attention maps of one input (T).
pub fn classifier_maps(model: &mut Classifier, tokens: &[u32]) -> Result<Vec<AttentionMap>> {
    let h = model.config.n_heads;
    record(&mut model.encoder, true);
    let run = model
        .features(Tokens::new(tokens, 1, tokens.len())?)
        .map(|_| ());
    let maps = collect(&model.encoder, MapKind::EncoderSelf, h, tokens.len());
    record(&mut model.encoder, false);
    run?;
    Ok(maps)
}

/// Masked self-attention maps of a language model over one sequence (T).
pub fn lm_maps(model: &mut LanguageModel, tokens: &[u32]) -> Result<Vec<AttentionMap>> {
    let h = model.config.n_heads;
    record(&mut model.decoder, true);
    let run = model
        .logits(Tokens::new(tokens, 1, tokens.len())?)
        .map(|_| ());
    let maps = collect(&model.decoder, MapKind::DecoderSelf, h, tokens.len());
    record(&mut model.decoder, false);
    run?;
    Ok(maps)
}

fn record(stack: &mut Stack, on: bool) {
    for l in &mut stack.layers {
        l.self_attn.record_weights(on);
        if let Some(cross) = &mut l.cross {
            cross.attn.record_weights(on);
        }
    }
}

/// The self-attention maps a stack recorded over a sequence of `t` tokens.
fn collect(stack: &Stack, kind: MapKind, heads: usize, t: usize) -> Vec<AttentionMap> {
    stack
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.self_attn.weights().map(|w| map(kind, i, heads, t, t, w)))
        .collect()
}
