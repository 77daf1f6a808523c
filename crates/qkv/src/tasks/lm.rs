//! Language modelling: a token stream cut into contiguous blocks, perplexity and bits per
//! character on held-out text, and generation from a prompt.

use crate::data::{LmBatch, Tokenizer};
use crate::decode::{generate, Choice};
use crate::error::{Error, Result};
use crate::model::LanguageModel;
use crate::rng::{hash, Rng};

/// A text as one token stream, starting with EOS (the document separator, also what generation
/// starts from).
#[derive(Clone, Debug, Default)]
pub struct TokenStream {
    pub ids: Vec<u32>,
    /// Characters of the text, for bits per character.
    pub chars: usize,
}

/// Tokenize line by line (keeping the newlines, which carry a play's layout).
pub fn encode_text(tok: &Tokenizer, text: &str) -> Result<TokenStream> {
    let mut ids = vec![tok.eos];
    for line in text.split_inclusive('\n') {
        ids.extend(tok.encode(line)?);
    }
    Ok(TokenStream {
        ids,
        chars: text.chars().count(),
    })
}

impl TokenStream {
    /// Non-overlapping blocks of `len + 1` tokens (input and shifted target).
    fn blocks(&self, len: usize) -> Vec<&[u32]> {
        let n = self.ids.len().saturating_sub(1) / len.max(1);
        (0..n)
            .map(|i| &self.ids[i * len..i * len + len + 1])
            .collect()
    }

    /// An epoch's batches of `max_tokens / len` blocks, block order shuffled by (seed, epoch).
    /// Each epoch shifts the block boundaries by an offset, so positions see varied contexts.
    pub fn epoch_batches(
        &self,
        len: usize,
        max_tokens: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Vec<LmBatch>> {
        if len == 0 {
            return Err(Error::Config(
                "language-model blocks need max_len >= 2".into(),
            ));
        }
        if self.ids.len() < len + 2 {
            return Err(Error::Config(format!(
                "the text has {} tokens, fewer than one block of {} (lower max_len)",
                self.ids.len(),
                len + 1
            )));
        }
        let mut rng = Rng::new(hash(seed, epoch));
        // Never so far that not one whole block is left.
        let max_offset = len.min(self.ids.len() - 1 - len);
        let offset = if seed == 0 && epoch == 0 {
            0
        } else {
            rng.below(max_offset as u64 + 1) as usize
        };
        let shifted = TokenStream {
            ids: self.ids[offset..].to_vec(),
            chars: 0,
        };
        let mut blocks = shifted.blocks(len);
        for i in (1..blocks.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            blocks.swap(i, j);
        }
        let per_batch = (max_tokens / len).max(1);
        Ok(blocks.chunks(per_batch).map(LmBatch::new).collect())
    }
}

/// Continue each prompt: `max_new` tokens at most, stopping at EOS, each chosen by its own
/// `choices[i]` (or `choices[0]` for all). Returns prompt and continuation as one text.
pub fn complete(
    model: &mut LanguageModel,
    tok: &Tokenizer,
    prompts: &[String],
    max_new: usize,
    choices: &[Choice],
) -> Result<Vec<String>> {
    let mut prefixes = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut ids = vec![tok.eos];
        ids.extend(tok.encode(p)?);
        prefixes.push(ids);
    }
    let longest = prefixes.iter().map(|p| p.len()).max().unwrap_or(1);
    if longest >= model.config.max_len {
        return Err(Error::SequenceTooLong {
            input: "prompt",
            len: longest,
            max_len: model.config.max_len,
        });
    }
    let mut cache = model.start_decoding(prompts.len(), longest.saturating_add(max_new));
    let out = generate(model, &mut cache, &prefixes, tok.eos, choices)?;
    // Prompt and continuation are decoded together: subword decoders join pieces across the
    // boundary (e.g. the space before a word-initial piece).
    let mut texts = Vec::with_capacity(out.len());
    for (prefix, ids) in prefixes.iter().zip(&out) {
        let mut all = prefix.clone();
        all.extend_from_slice(&ids[..ids.len().min(max_new)]);
        texts.push(tok.decode(&all)?);
    }
    Ok(texts)
}
