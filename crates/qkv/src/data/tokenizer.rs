//! Subword tokenization with the HF `tokenizers` crate: train a BPE vocabulary from text, or load
//! any `tokenizer.json` (BPE, WordPiece, Unigram). qkv's special tokens are defined once here.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::pre_tokenizers::metaspace::Metaspace;
use tokenizers::AddedToken;

/// Special tokens of tokenizers trained by qkv, in id order (so `<pad>` is 0, as models assume).
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// Names other tokenizers use for the same roles (BERT's WordPiece, GPT-2's byte-level BPE).
const PAD_NAMES: [&str; 3] = ["<pad>", "[PAD]", "<|pad|>"];
const BOS_NAMES: [&str; 4] = ["<s>", "[CLS]", "<bos>", "<|endoftext|>"];
const EOS_NAMES: [&str; 4] = ["</s>", "[SEP]", "<eos>", "<|endoftext|>"];
const UNK_NAMES: [&str; 3] = ["<unk>", "[UNK]", "<|unk|>"];

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A tokenizer plus the ids of its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
    pub unk: Option<u32>,
}

impl Tokenizer {
    /// Train a BPE vocabulary of `vocab_size` entries (specials included) over `texts`:
    /// NFKC normalization and SentencePiece-style whitespace (`▁` marks a word start), so
    /// decoding restores the original spacing.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize, show_progress: bool) -> Result<Self>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size <= SPECIAL_TOKENS.len() {
            return Err(Error::Config(format!(
                "vocabulary size {vocab_size} leaves no room beside the {} special tokens",
                SPECIAL_TOKENS.len()
            )));
        }
        let model = BPE::builder()
            .unk_token(SPECIAL_TOKENS[3].to_string())
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner
            .with_normalizer(Some(NFKC))
            .with_pre_tokenizer(Some(Metaspace::default()))
            .with_decoder(Some(Metaspace::default()));
        let specials = SPECIAL_TOKENS
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(specials)
            .show_progress(show_progress)
            .build()
            .into();
        inner.train(&mut trainer, texts).map_err(tok_err)?;
        Self::from_inner(inner)
    }

    /// Load a `tokenizer.json` written by qkv or by HF tokenizers.
    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_inner(inner)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let missing = |role: &str, names: &[&str]| {
            Error::Tokenizer(format!("no {role} token (looked for {})", names.join(", ")))
        };
        Ok(Self {
            pad: find(&PAD_NAMES).ok_or_else(|| missing("padding", &PAD_NAMES))?,
            bos: find(&BOS_NAMES).ok_or_else(|| missing("begin-of-sequence", &BOS_NAMES))?,
            eos: find(&EOS_NAMES).ok_or_else(|| missing("end-of-sequence", &EOS_NAMES))?,
            unk: find(&UNK_NAMES),
            inner,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Text → ids, without special tokens (callers add BOS/EOS where their model wants them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids → text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// The surface form of each id (for attention-map labels).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
