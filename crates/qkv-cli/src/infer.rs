//! `qkv translate`, `qkv classify`, `qkv generate` (stdin → stdout, batched) and `qkv average`.

use crate::eval::{load_model_dir, AnyModel, Loaded};
use crate::PrecisionArgs;
use anyhow::{bail, Context, Result};
use qkv::decode::{BeamConfig, Choice, Sampling};
use qkv::tasks::classify::{argmax, embed, predict};
use qkv::tasks::lm::complete;
use qkv::tasks::translate::{translate, TranslateOptions};
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Lines of stdin (empty ones kept, so outputs align with inputs); invalid UTF-8 names the line.
fn stdin_lines() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}", i + 1))?;
        out.push(line.trim_end_matches('\r').to_string());
    }
    Ok(out)
}

#[derive(clap::Args)]
pub struct TranslateArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub beam: usize,
    /// Hypotheses per input (tab-separated on one line), at most --beam.
    #[arg(long, default_value_t = 1)]
    pub nbest: usize,
    #[arg(long, default_value_t = 1.0)]
    pub lenpen: f32,
    /// Output length limit a·source_len + b.
    #[arg(long, default_value_t = 1.5)]
    pub max_len_a: f32,
    #[arg(long, default_value_t = 10)]
    pub max_len_b: usize,
    /// Source tokens per decoding batch.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

pub fn run_translate(a: TranslateArgs) -> Result<()> {
    let _precision = a.precision.apply();
    if a.beam == 0 || a.nbest == 0 || a.nbest > a.beam {
        bail!(
            "need 1 <= --nbest <= --beam, got --nbest {} --beam {}",
            a.nbest,
            a.beam
        );
    }
    let Loaded {
        model,
        tok,
        tgt_tok,
        ..
    } = load_model_dir(&a.model)?;
    let AnyModel::Seq2Seq(mut model) = model else {
        bail!("{} is not a translation model", a.model.display());
    };
    let opts = TranslateOptions {
        beam: BeamConfig {
            beam: a.beam,
            length_penalty: a.lenpen,
            nbest: a.nbest,
        },
        max_len_a: a.max_len_a,
        max_len_b: a.max_len_b,
        max_tokens: a.max_tokens.max(1),
    };
    let lines = stdin_lines()?;
    let out = translate(&mut model, &tok, &tgt_tok, &lines, &opts)?;
    let mut stdout = std::io::stdout().lock();
    for hyps in out {
        writeln!(stdout, "{}", hyps.join("\t"))?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// One line per input: `label<TAB>probability`.
pub fn run_classify(a: ClassifyArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let Loaded {
        model, tok, labels, ..
    } = load_model_dir(&a.model)?;
    let (AnyModel::Classifier(mut model), Some(labels)) = (model, labels) else {
        bail!("{} is not a classification model", a.model.display());
    };
    let lines = stdin_lines()?;
    let probs = predict(&mut model, &tok, &lines, 8192)?;
    let mut stdout = std::io::stdout().lock();
    for p in probs {
        let k = argmax(&p) as usize;
        writeln!(stdout, "{}\t{:.4}", labels.0[k], p[k])?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt to continue (default: read prompts from stdin, one per line).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Pick the most likely token instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let Loaded { model, tok, .. } = load_model_dir(&a.model)?;
    let AnyModel::Lm(mut model) = model else {
        bail!("{} is not a language model", a.model.display());
    };
    let prompts = match a.prompt {
        Some(p) => vec![p],
        None => stdin_lines()?,
    };
    let choice = if a.greedy {
        Choice::Greedy
    } else {
        Choice::Sample(Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        })
    };
    let max_new = a.max_new_tokens.min(model.config.max_len.saturating_sub(1));
    let out = complete(&mut model, &tok, &prompts, max_new, &choice)?;
    let mut stdout = std::io::stdout().lock();
    for text in out {
        writeln!(stdout, "{text}")?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// A Hugging Face BERT-family encoder (config.json, model.safetensors, tokenizer.json), or a
    /// qkv classifier directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Input tokens per batch.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// Sentence embeddings of stdin lines: one JSON array (mean-pooled, unit length) per line.
pub fn run_embed(a: EmbedArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let Loaded { model, tok, .. } = load_model_dir(&a.model)?;
    let AnyModel::Classifier(mut model) = model else {
        bail!(
            "{} is not an encoder (embeddings need a classifier or a BERT-family model)",
            a.model.display()
        );
    };
    let lines = stdin_lines()?;
    let out = embed(&mut model, &tok, &lines, a.max_tokens.max(1))?;
    let mut stdout = std::io::stdout().lock();
    for v in out {
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct AverageArgs {
    /// Checkpoint directories of one model (e.g. runs/x/checkpoint-*).
    #[arg(long, num_args = 1.., required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub output: PathBuf,
}

/// Average parameters; the output directory gets the first input's config and tokenizer files.
pub fn run_average(a: AverageArgs) -> Result<()> {
    let first = &a.inputs[0];
    let Loaded { model, .. } = load_model_dir(first)?;
    let (cfg, mut params) = match model {
        AnyModel::Seq2Seq(m) => (m.config, m.params),
        AnyModel::Classifier(m) => (m.config, m.params),
        AnyModel::Lm(m) => (m.config, m.params),
    };
    for dir in &a.inputs {
        let c = qkv::checkpoint::load_config(dir)?;
        if c != cfg {
            bail!("{}: config differs from {}", dir.display(), first.display());
        }
    }
    qkv::train::average_checkpoints(&a.inputs, &mut params)?;
    qkv::checkpoint::save(&a.output, &cfg, &params, None)?;
    for f in [
        "tokenizer.json",
        crate::eval::TARGET_TOKENIZER,
        crate::eval::LABELS_FILE,
    ] {
        if first.join(f).exists() {
            std::fs::copy(first.join(f), a.output.join(f))
                .with_context(|| format!("copying {f}"))?;
        }
    }
    eprintln!(
        "averaged {} checkpoints into {}",
        a.inputs.len(),
        a.output.display()
    );
    Ok(())
}
