//! Subword tokenization with the HF `tokenizers` crate: train a BPE vocabulary from text, or load
//! any `tokenizer.json` (BPE, WordPiece, Unigram). qkv's special tokens are defined once here.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::normalizers::{Lowercase, NormalizerWrapper, Sequence};
use tokenizers::pre_tokenizers::metaspace::Metaspace;
use tokenizers::AddedToken;

/// Special tokens of tokenizers trained by qkv, in id order (so `<pad>` is 0, as models assume).
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// Names other tokenizers use for the same roles (BERT's WordPiece, SentencePiece models).
/// A padding token is required (GPT-2's vocabulary has none: add one to its tokenizer.json).
const PAD_NAMES: [&str; 3] = ["<pad>", "[PAD]", "<|pad|>"];
const BOS_NAMES: [&str; 4] = ["<s>", "[CLS]", "<bos>", "<|endoftext|>"];
const EOS_NAMES: [&str; 4] = ["</s>", "[SEP]", "<eos>", "<|endoftext|>"];
const UNK_NAMES: [&str; 3] = ["<unk>", "[UNK]", "<|unk|>"];

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

thread_local! {
    /// Set while this thread runs code whose panics are caught and reported as errors.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `catch_unwind(f)` without the panic message on stderr. The process's panic hook is wrapped
/// once (not swapped per call): the wrapper stays silent only on a thread inside this
/// function and hands every other panic to the hook that was installed before, so
/// concurrent loads and other threads' panics keep their messages.
fn quiet_catch_unwind<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> std::thread::Result<T> {
    static WRAP: std::sync::Once = std::sync::Once::new();
    WRAP.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(|c| c.get()) {
                previous(info)
            }
        }));
    });
    CATCHING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(f);
    CATCHING.with(|c| c.set(false));
    result
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
        Self::train_bpe_with(texts, vocab_size, false, show_progress)
    }

    /// As [`Tokenizer::train_bpe`], optionally lowercasing after NFKC (an "uncased"
    /// vocabulary, as BERT-uncased: encoding lowercases too, and decoding gives lowercase).
    pub fn train_bpe_with<I, S>(
        texts: I,
        vocab_size: usize,
        lowercase: bool,
        show_progress: bool,
    ) -> Result<Self>
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
            .with_normalizer(Some(if lowercase {
                NormalizerWrapper::from(Sequence::new(vec![NFKC.into(), Lowercase.into()]))
            } else {
                NFKC.into()
            }))
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
        // tokenizers 0.22 panics on some malformed files (an `expect` in a deserializer)
        // instead of returning an error: catch it, and report the file.
        let loaded = quiet_catch_unwind(|| tokenizers::Tokenizer::from_file(path));
        let mut inner = match loaded {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(Error::Tokenizer(format!("{}: {e}", path.display()))),
            Err(_) => {
                return Err(Error::Tokenizer(format!(
                    "{}: not a valid tokenizer.json",
                    path.display()
                )))
            }
        };
        // qkv pads batches itself and truncates per task; a file's own settings (BERT's
        // tokenizer.json pads every input to 128) would otherwise leak into every encoding.
        inner.with_padding(None);
        inner
            .with_truncation(None)
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
            // Some vocabularies (T5's Unigram) have no BOS; decoding then starts from EOS.
            bos: find(&BOS_NAMES)
                .or_else(|| find(&EOS_NAMES))
                .ok_or_else(|| missing("begin-of-sequence", &BOS_NAMES))?,
            eos: find(&EOS_NAMES).ok_or_else(|| missing("end-of-sequence", &EOS_NAMES))?,
            unk: find(&UNK_NAMES),
            inner,
        })
    }

    /// Whether `other` encodes and decodes as this tokenizer does: the same vocabulary,
    /// merges, normalization and special tokens (compared as their serialized form).
    pub fn same_as(&self, other: &Tokenizer) -> bool {
        let json = |t: &Tokenizer| t.inner.to_string(false).ok();
        let specials = |t: &Tokenizer| (t.pad, t.bos, t.eos, t.unk);
        specials(self) == specials(other)
            && matches!((json(self), json(other)), (Some(a), Some(b)) if a == b)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Text → ids, without special tokens (callers add BOS/EOS where their model wants them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// One input as an encoder reads it: the file's own post-processing (BERT's
    /// `[CLS] … [SEP]`; nothing for qkv's tokenizers), with the text truncated so the result has
    /// at most `max_len` ids, specials included (as HF truncation does).
    pub fn encode_single(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        use tokenizers::tokenizer::{PostProcessor, TruncationDirection};
        let mut enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |pp| pp.added_tokens(false));
        if enc.len() + added > max_len {
            enc.truncate(max_len.saturating_sub(added), 0, TruncationDirection::Right);
        }
        let enc = self.inner.post_process(enc, None, true).map_err(tok_err)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("qkv-tok-{name}-{}.json", std::process::id()))
    }

    #[test]
    fn trained_bpe_round_trips_text_and_specials() {
        let text = [
            "In the beginning God created the heaven and the earth.",
            "Y la tierra estaba desordenada y vacía",
        ];
        let tok = Tokenizer::train_bpe(text.iter().cycle().take(20), 80, false).unwrap();
        assert_eq!((tok.pad, tok.bos, tok.eos, tok.unk), (0, 1, 2, Some(3)));
        let path = scratch("bpe");
        tok.save(&path).unwrap();
        let back = Tokenizer::load(&path).unwrap();
        for t in text {
            let ids = back.encode(t).unwrap();
            assert_eq!(ids, tok.encode(t).unwrap());
            assert_eq!(back.decode(&ids).unwrap(), t);
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn lowercased_bpe_encodes_case_variants_alike_and_survives_a_round_trip() {
        let text = ["The Cat sat on the mat", "the cat SAT on The Mat"];
        let tok = Tokenizer::train_bpe_with(text.iter().cycle().take(20), 60, true, false).unwrap();
        let path = scratch("lower");
        tok.save(&path).unwrap();
        let back = Tokenizer::load(&path).unwrap();
        assert_eq!(
            back.encode("THE CAT").unwrap(),
            back.encode("the cat").unwrap()
        );
        assert_eq!(
            back.decode(&back.encode("The Cat").unwrap()).unwrap(),
            "the cat"
        );
        let cased = Tokenizer::train_bpe(text.iter().cycle().take(20), 60, false).unwrap();
        assert_ne!(
            cased.encode("THE CAT").unwrap(),
            cased.encode("the cat").unwrap()
        );
        let _ = std::fs::remove_file(path);
    }

    /// A BERT-style WordPiece `tokenizer.json` written by hand, as HF ships them.
    #[test]
    fn loads_wordpiece_and_unigram_tokenizer_json() {
        let special = |id: u32, s: &str| {
            format!(
                r#"{{"id":{id},"content":"{s}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
            )
        };
        let wordpiece = format!(
            r###"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{},{},{}],
            "normalizer":{{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true}},
            "pre_tokenizer":{{"type":"BertPreTokenizer"}},"post_processor":null,
            "decoder":{{"type":"WordPiece","prefix":"##","cleanup":true}},
            "model":{{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,
              "vocab":{{"[PAD]":0,"[UNK]":1,"[CLS]":2,"[SEP]":3,"the":4,"king":5,"##s":6,"house":7}}}}}}"###,
            special(0, "[PAD]"),
            special(1, "[UNK]"),
            special(2, "[CLS]"),
            special(3, "[SEP]")
        );
        let path = scratch("wordpiece");
        std::fs::write(&path, wordpiece).unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        assert_eq!((tok.pad, tok.bos, tok.eos, tok.unk), (0, 2, 3, Some(1)));
        let ids = tok.encode("The Kings house zebra").unwrap();
        assert_eq!(ids, vec![4, 5, 6, 7, 1]);
        assert_eq!(tok.decode(&ids[..4]).unwrap(), "the kings house");

        let unigram = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{},{}],
            "normalizer":null,
            "pre_tokenizer":{{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}},
            "post_processor":null,
            "decoder":{{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}},
            "model":{{"type":"Unigram","unk_id":2,"byte_fallback":false,
              "vocab":[["<pad>",0.0],["</s>",0.0],["<unk>",0.0],["▁the",-1.0],["▁king",-2.0],["s",-3.0],["▁",-4.0],["k",-5.0],["i",-5.0],["n",-5.0],["g",-5.0]]}}}}"#,
            special(0, "<pad>"),
            special(1, "</s>"),
            special(2, "<unk>")
        );
        std::fs::write(&path, unigram).unwrap();
        let tok = Tokenizer::load(&path).unwrap();
        // No BOS in this vocabulary: decoding starts from EOS.
        assert_eq!((tok.pad, tok.bos, tok.eos, tok.unk), (0, 1, 1, Some(2)));
        let ids = tok.encode("the kings").unwrap();
        assert_eq!(ids, vec![3, 4, 5]);
        assert_eq!(tok.decode(&ids).unwrap(), "the kings");
        // Not a tokenizer, or a malformed part that makes tokenizers panic: clear errors.
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let err = Tokenizer::load(&path).err().unwrap().to_string();
        assert!(err.contains("qkv-tok-wordpiece"), "{err}");
        std::fs::write(&path, r#"{"version":"1.0","added_tokens":[],"decoder":{"type":"WordPiece","prefix":"\q"},"model":{"type":"WordPiece","vocab":{}}}"#).unwrap();
        let err = Tokenizer::load(&path).err().unwrap().to_string();
        assert!(err.contains("qkv-tok-wordpiece"), "{err}");
        let _ = std::fs::remove_file(path);
    }
}
