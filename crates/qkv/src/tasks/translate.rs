//! Translation: tokenized sentence pairs, epoch batches, and batched beam/greedy translation.
//! Source and target tokenizers may be one (a joint vocabulary) or two (one per side); their
//! special-token ids must agree.

use crate::data::{batches_by_tokens, Seq2SeqBatch, Tokenizer};
use crate::decode::{beam_search, greedy, BeamConfig};
use crate::error::Result;
use crate::model::{Seq2Seq, Tokens};

/// Tokenized pairs (without BOS/EOS).
#[derive(Clone, Debug, Default)]
pub struct ParallelData {
    pub pairs: Vec<(Vec<u32>, Vec<u32>)>,
    /// Pairs dropped because a side did not fit `max_len`.
    pub dropped_long: usize,
}

/// Tokenize `pairs`; pairs with a side longer than `max_len - 1` tokens (room for BOS/EOS)
/// are dropped and counted (fairseq's `--skip-invalid-size-inputs-valid-test`).
pub fn encode_pairs(
    src_tok: &Tokenizer,
    tgt_tok: &Tokenizer,
    pairs: &[(String, String)],
    max_len: usize,
) -> Result<ParallelData> {
    let mut out = ParallelData::default();
    for (s, t) in pairs {
        let (s, t) = (src_tok.encode(s)?, tgt_tok.encode(t)?);
        if s.len() + 1 > max_len || t.len() + 1 > max_len {
            out.dropped_long += 1;
        } else {
            out.pairs.push((s, t));
        }
    }
    Ok(out)
}

impl ParallelData {
    /// The batches of one epoch: ~`max_tokens` padded tokens each, order fixed by (seed, epoch).
    pub fn epoch_batches(
        &self,
        tok: &Tokenizer,
        max_tokens: usize,
        seed: u64,
        epoch: u64,
    ) -> Vec<Seq2SeqBatch> {
        let lengths: Vec<usize> = self
            .pairs
            .iter()
            .map(|(s, t)| s.len().max(t.len()) + 1)
            .collect();
        batches_by_tokens(&lengths, max_tokens, seed, epoch)
            .into_iter()
            .map(|idx| {
                let pairs: Vec<(&[u32], &[u32])> = idx
                    .iter()
                    .map(|&i| (self.pairs[i].0.as_slice(), self.pairs[i].1.as_slice()))
                    .collect();
                Seq2SeqBatch::new(&pairs, tok.pad, tok.bos, tok.eos)
            })
            .collect()
    }
}

/// How sentences are translated.
#[derive(Clone, Debug)]
pub struct TranslateOptions {
    /// `beam == 1` is greedy decoding.
    pub beam: BeamConfig,
    /// Output length limit `a · source_len + b` tokens (fairseq's `--max-len-a/b`), capped by
    /// the model's `max_len`.
    pub max_len_a: f32,
    pub max_len_b: usize,
    /// Source tokens per decoding batch.
    pub max_tokens: usize,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            beam: BeamConfig::default(),
            max_len_a: 1.5,
            max_len_b: 10,
            max_tokens: 4096,
        }
    }
}

/// Translate `sources`; returns, per source, `nbest` outputs (best first).
/// Sources longer than the model's `max_len` are truncated to fit.
pub fn translate(
    model: &mut Seq2Seq,
    src_tok: &Tokenizer,
    tgt_tok: &Tokenizer,
    sources: &[String],
    opts: &TranslateOptions,
) -> Result<Vec<Vec<String>>> {
    let max_len = model.config.max_len;
    let mut encoded = Vec::with_capacity(sources.len());
    for s in sources {
        let mut ids = src_tok.encode(s)?;
        ids.truncate(max_len - 1);
        ids.push(src_tok.eos);
        encoded.push(ids);
    }
    // Longest first, so the first batches are the slowest and memory peaks early.
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
    let mut out = vec![Vec::new(); sources.len()];
    let mut start = 0;
    while start < order.len() {
        let longest = encoded[order[start]].len();
        let rows = (opts.max_tokens / longest.max(1))
            .max(1)
            .min(order.len() - start);
        let chunk = &order[start..start + rows];
        start += rows;
        let mut src = Vec::with_capacity(rows * longest);
        for &i in chunk {
            src.extend_from_slice(&encoded[i]);
            src.extend(std::iter::repeat_n(src_tok.pad, longest - encoded[i].len()));
        }
        // Each of the `out_len` positions fed (BOS first) yields one token, so outputs hold at
        // most `out_len` tokens, EOS included.
        let out_len = ((opts.max_len_a.max(0.0) * longest as f32) as usize)
            .saturating_add(opts.max_len_b)
            .clamp(1, max_len);
        let mut cache = model.start_decoding(Tokens::new(&src, rows, longest)?, out_len)?;
        let hyps: Vec<Vec<Vec<u32>>> = if opts.beam.beam <= 1 && opts.beam.nbest <= 1 {
            greedy(model, &mut cache, tgt_tok.bos, tgt_tok.eos)?
                .into_iter()
                .map(|t| vec![t])
                .collect()
        } else {
            beam_search(model, &mut cache, tgt_tok.bos, tgt_tok.eos, &opts.beam)?
                .into_iter()
                .map(|h| h.into_iter().map(|h| h.tokens).collect())
                .collect()
        };
        for (&i, h) in chunk.iter().zip(hyps) {
            out[i] = h.iter().map(|t| tgt_tok.decode(t)).collect::<Result<_>>()?;
        }
    }
    Ok(out)
}

/// Per-side tokenizers must agree on the special ids the model and batches use.
pub fn check_specials(src_tok: &Tokenizer, tgt_tok: &Tokenizer) -> Result<()> {
    let ids = |t: &Tokenizer| (t.pad, t.bos, t.eos);
    if ids(src_tok) != ids(tgt_tok) {
        return Err(crate::error::Error::Tokenizer(format!(
            "source and target tokenizers disagree on (pad, bos, eos): {:?} vs {:?}",
            ids(src_tok),
            ids(tgt_tok)
        )));
    }
    Ok(())
}
