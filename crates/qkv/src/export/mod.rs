//! Model directories written in other toolkits' formats, so a model trained here runs where
//! its users deploy: CTranslate2 (OpenNMT's inference engine) and Hugging Face transformers
//! (MarianMT).

pub mod ctranslate2;
pub mod huggingface;

use crate::data::Tokenizer;
use crate::error::{Error, Result};
use crate::model_dir::ModelDir;
use std::path::{Path, PathBuf};

/// Every token of `tok` by id.
fn tokens(tok: &Tokenizer) -> Result<Vec<String>> {
    (0..tok.vocab_size() as u32)
        .map(|id| {
            tok.id_to_token(id)
                .ok_or_else(|| Error::Tokenizer(format!("no token has id {id}")))
        })
        .collect()
}

/// The tokenizers' vocabularies and special tokens as CTranslate2 names them.
pub fn ctranslate2_vocabularies(dir: &ModelDir) -> Result<ctranslate2::Vocabularies> {
    let src = &dir.files.tokenizer;
    let tgt = dir.files.target_tokenizer();
    let name = |id: Option<u32>, what: &str| {
        id.and_then(|id| tgt.id_to_token(id)).ok_or_else(|| {
            Error::Config(format!(
                "CTranslate2 export: the target tokenizer has no {what} token, which \
                 CTranslate2 needs"
            ))
        })
    };
    Ok(ctranslate2::Vocabularies {
        source: tokens(src)?,
        target: tokens(tgt)?,
        unk: name(tgt.unk, "unknown")?,
        bos: name(Some(tgt.bos), "begin-of-sequence")?,
        eos: name(Some(tgt.eos), "end-of-sequence")?,
    })
}

/// Export the qkv model directory `model` into `out` as a CTranslate2 model; returns the
/// files written.
pub fn to_ctranslate2(model: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let dir = ModelDir::load(model)?;
    let cfg = dir.model.config();
    ctranslate2::check_exportable(cfg)?;
    let vocab = ctranslate2_vocabularies(&dir)?;
    ctranslate2::write(cfg, dir.model.params(), &vocab, out)
}

/// Export the qkv model directory `model` into `out` as a Hugging Face MarianMT model with
/// its tokenizer (`tokenizer.json`, and `target_tokenizer.json` for a second vocabulary);
/// returns the files written.
pub fn to_huggingface(model: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let dir = ModelDir::load(model)?;
    let cfg = dir.model.config();
    huggingface::check_exportable(cfg)?;
    let vocab = ctranslate2_vocabularies(&dir)?;
    let tgt = dir.files.target_tokenizer();
    let ids = huggingface::SpecialIds {
        pad: tgt.pad,
        bos: tgt.bos,
        eos: tgt.eos,
    };
    let mut files =
        huggingface::write(cfg, dir.model.params(), &vocab, ids, &dir.files.decode, out)?;
    let path = out.join(crate::model_dir::TOKENIZER_FILE);
    dir.files.tokenizer.save(&path)?;
    files.push(path);
    if let Some(t) = &dir.files.target_tokenizer {
        let path = out.join(crate::model_dir::TARGET_TOKENIZER_FILE);
        t.save(&path)?;
        files.push(path);
    }
    Ok(files)
}
