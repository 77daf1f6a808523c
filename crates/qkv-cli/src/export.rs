//! `qkv export`: a model directory in another toolkit's format.

use anyhow::Result;
use clap::ValueEnum;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// CTranslate2 (model.bin, config.json, vocabularies), for seq2seq models.
    Ctranslate2,
    /// Hugging Face transformers' MarianMT (config, safetensors, tokenizer), for post-LN
    /// seq2seq models with sinusoidal positions.
    Hf,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The qkv model directory (e.g. runs/translate-en-es/best).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Directory to write (created; a model already there is not overwritten).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let files = match a.format {
        Format::Ctranslate2 => qkv::export::to_ctranslate2(&a.model, &a.out)?,
        Format::Hf => qkv::export::to_huggingface(&a.model, &a.out)?,
    };
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
