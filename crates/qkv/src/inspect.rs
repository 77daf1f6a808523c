//! Attention maps of one input, for visualisation (`qkv attention`): the weights of every
//! layer and head, for each attention the model has — encoder self-attention (Figure 1, left),
//! decoder masked self-attention and encoder–decoder cross-attention (Figure 1, right).
//!
//! Layers record their weights only while asked (`record_weights`), which makes them run the
//! materialized kernel for that forward; the flags are cleared again before returning.

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::model::stack::Stack;
use crate::model::{AnyModel, Classifier, LanguageModel, Seq2Seq, Tokens};
use crate::model_dir::ModelDir;
use crate::tasks::{classify, translate};

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

/// Token labels and attention maps of one input.
pub struct Inspection {
    pub source: Vec<String>,
    /// Decoder positions (translation: BOS then the target; LM: its tokens); empty otherwise.
    pub target: Vec<String>,
    pub maps: Vec<AttentionMap>,
}

fn labels(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.id_to_token(i).unwrap_or_else(|| format!("#{i}")))
        .collect()
}

/// Tokenize `input` as the model reads it and collect every attention map. A translation
/// model attends over `target`, or without one over its own greedy translation (within
/// its decoding defaults' length limit). An input longer than the model reads is an error.
pub fn inspect(dir: &mut ModelDir, input: &str, target: Option<&str>) -> Result<Inspection> {
    let files = &dir.files;
    let tok = &files.tokenizer;
    match &mut dir.model {
        AnyModel::Seq2Seq(m) => {
            let limit = translate::source_limit(m);
            let src = translate::encode_sources(tok, &[input.to_string()], limit, None)?.remove(0);
            let tgt_tok = files.target_tokenizer();
            let max_len = m.config.max_len;
            let out = match target {
                Some(t) => tgt_tok.encode(t)?,
                None => {
                    let limit = files.decode.max_output(src.len(), max_len);
                    let mut cache = m.start_decoding(Tokens::new(&src, 1, src.len())?, limit)?;
                    crate::decode::greedy(m, &mut cache, tgt_tok.bos, tgt_tok.eos)?
                        .pop()
                        .unwrap_or_default()
                }
            };
            let mut tgt_in = vec![tgt_tok.bos];
            tgt_in.extend(out.iter().copied().filter(|&t| t != tgt_tok.eos));
            if tgt_in.len() > max_len {
                return Err(Error::InputTooLong {
                    index: 0,
                    len: tgt_in.len() - 1,
                    limit: max_len - 1,
                });
            }
            let maps = seq2seq_maps(m, &src, &tgt_in)?;
            Ok(Inspection {
                source: labels(tok, &src),
                target: labels(tgt_tok, &tgt_in),
                maps,
            })
        }
        AnyModel::Classifier(m) => {
            let ids = classify::encode_texts(tok, &[input.to_string()], m.config.max_len, None)?
                .remove(0);
            let maps = classifier_maps(m, &ids)?;
            Ok(Inspection {
                source: labels(tok, &ids),
                target: Vec::new(),
                maps,
            })
        }
        AnyModel::Lm(m) => {
            // As in generation: the text follows a start token (EOS).
            let mut ids = vec![tok.eos];
            ids.extend(tok.encode(input)?);
            if ids.len() > m.config.max_len {
                return Err(Error::InputTooLong {
                    index: 0,
                    len: ids.len() - 1,
                    limit: m.config.max_len - 1,
                });
            }
            let maps = lm_maps(m, &ids)?;
            let l = labels(tok, &ids);
            Ok(Inspection {
                source: l.clone(),
                target: l,
                maps,
            })
        }
    }
}
