//! `qkv translate`, `qkv classify`, `qkv generate`, `qkv embed` (stdin → stdout, batched) and
//! `qkv average`, over `qkv::model_dir::ModelDir` and the tasks' prediction functions.

use crate::args::{first_gpu, name_input, stdin_lines, DeviceArg, PrecisionArgs};
use anyhow::{bail, Result};
use qkv::decode::{argmax, Choice, DecodeConfig};
use qkv::model::{AnyModel, Decoding, EncoderDecoder, Ensemble, Seq2Seq, ToBackend};
use qkv::model_dir::{ModelDir, ModelFiles};
use qkv::tasks::{classify, lm, translate};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Decoding flags; each overrides the model's own default (its job's `decode` section).
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Beam width (1: greedy).
    #[arg(long)]
    pub beam: Option<usize>,
    /// Length penalty (fairseq's --lenpen).
    #[arg(long)]
    pub lenpen: Option<f32>,
    /// Output length limit a·source_len + b.
    #[arg(long)]
    pub max_len_a: Option<f32>,
    #[arg(long)]
    pub max_len_b: Option<usize>,
    /// No end of output before this many tokens (fairseq's --min-len).
    #[arg(long)]
    pub min_len: Option<usize>,
    /// Never repeat an n-gram of this size in an output (fairseq's --no-repeat-ngram-size).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Minimum Bayes risk: output, of the beam's best N, the one most alike the others
    /// (ROUGE-L for a summarizer, chrF for a translator); 0 or 1: the most probable.
    #[arg(long)]
    pub mbr: Option<usize>,
    /// With --mbr: score the candidates against N samples per input (drawn by --temperature,
    /// --top-k, --top-p, --seed) instead of against each other; 0: against each other.
    #[arg(long)]
    pub mbr_references: Option<usize>,
    /// Draw --beam outputs per input by sampling instead of beam search (fairseq's
    /// --sampling), e.g. as candidates for --mbr; `--sampling false` turns off a model's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub sampling: Option<bool>,
    /// Sampling temperature (with --sampling or --mbr-references).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the k most likely tokens (with --sampling).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability reaches p (with --sampling).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the samples (with --sampling or --mbr-references).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl DecodeArgs {
    /// The model's decoding defaults with these flags applied.
    pub fn over(&self, base: &DecodeConfig) -> Result<DecodeConfig> {
        let d = DecodeConfig {
            beam: self.beam.unwrap_or(base.beam),
            length_penalty: self.lenpen.unwrap_or(base.length_penalty),
            max_len_a: self.max_len_a.unwrap_or(base.max_len_a),
            max_len_b: self.max_len_b.unwrap_or(base.max_len_b),
            min_len: self.min_len.unwrap_or(base.min_len),
            no_repeat_ngram_size: self
                .no_repeat_ngram_size
                .unwrap_or(base.no_repeat_ngram_size),
            mbr: self.mbr.unwrap_or(base.mbr),
            mbr_references: self.mbr_references.unwrap_or(base.mbr_references),
            sampling: self.sampling.unwrap_or(base.sampling),
            temperature: self.temperature.unwrap_or(base.temperature),
            top_k: self.top_k.or(base.top_k),
            top_p: self.top_p.or(base.top_p),
            seed: self.seed.unwrap_or(base.seed),
            ..base.clone()
        };
        d.validate()?;
        Ok(d)
    }
}

#[derive(clap::Args)]
pub struct TranslateArgs {
    /// Model directory; several (`--model a b`, or the flag repeated) decode as an ensemble
    /// that averages their next-token probabilities, with the first's tokenizer and decoding
    /// defaults.
    #[arg(long, required = true, num_args = 1..)]
    pub model: Vec<PathBuf>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    /// Hypotheses per input (tab-separated on one line), at most the beam.
    #[arg(long, default_value_t = 1)]
    pub nbest: usize,
    /// Source tokens per decoding batch (greedy decoding refills its batch as rows end, with
    /// chunks of an eighth as many).
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Where the model decodes: the CPU, or the first NVIDIA GPU (one model; batches of
    /// --max-tokens decode whole there).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

fn load(path: &Path) -> Result<ModelDir> {
    Ok(ModelDir::load(path)?)
}

fn not_a(path: &Path, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{} is not {what}", path.display())
}

/// A translation model, or several as an ensemble, with the (first) model's files.
pub enum Translator {
    One(Box<Seq2Seq>),
    Ensemble(Ensemble),
}

/// Load `paths` as one translation (or summarization) model or an ensemble of them, each with
/// `precision`'s decoding steps.
pub fn load_translator(
    paths: &[PathBuf],
    precision: PrecisionArgs,
) -> Result<(Translator, ModelFiles)> {
    let mut dirs = Vec::with_capacity(paths.len());
    for path in paths {
        let mut dir = load(path)?;
        precision.apply_to(&mut dir.model)?;
        dirs.push((path.clone(), dir));
    }
    if let [(path, _)] = &dirs[..] {
        let path = path.clone();
        let dir = dirs.pop().expect("one model").1;
        let AnyModel::Seq2Seq(model) = dir.model else {
            return Err(not_a(&path, "a translation model"));
        };
        return Ok((Translator::One(Box::new(model)), dir.files));
    }
    let (ensemble, files) = qkv::model_dir::ensemble(dirs)?;
    Ok((Translator::Ensemble(ensemble), files))
}

pub fn run_translate(a: TranslateArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let (mut model, files) = load_translator(&a.model, a.precision)?;
    let opts = translate::TranslateOptions {
        decode: a.decode.over(&files.decode)?,
        nbest: a.nbest,
        max_tokens: a.max_tokens.max(1),
        sample_ids: Vec::new(),
    };
    if a.nbest == 0 || a.nbest > opts.decode.beam {
        bail!(
            "need 1 <= --nbest <= --beam, got --nbest {} --beam {}",
            a.nbest,
            opts.decode.beam
        );
    }
    let gpu = match (a.device, &model) {
        (DeviceArg::Cpu, _) => None,
        (DeviceArg::Cuda, Translator::Ensemble(_)) => {
            bail!("--device cuda decodes one model: an ensemble decodes on the CPU")
        }
        (DeviceArg::Cuda, Translator::One(_)) => Some(first_gpu(a.precision)?),
    };
    let lines = stdin_lines()?;
    match (&mut model, gpu) {
        (Translator::One(m), Some(gpu)) => {
            translate_lines(&mut m.to_backend(gpu)?, &files, &lines, &opts)
        }
        (Translator::One(m), None) => translate_lines(&mut **m, &files, &lines, &opts),
        (Translator::Ensemble(m), _) => translate_lines(m, &files, &lines, &opts),
    }
}

fn translate_lines<B: Decoding, M: EncoderDecoder<B>>(
    model: &mut M,
    files: &ModelFiles,
    lines: &[String],
    opts: &translate::TranslateOptions,
) -> Result<()> {
    let out =
        translate::translate(model, files, lines, opts).map_err(|e| name_input(e, "stdin line"))?;
    if out.cut > 0 {
        eprintln!(
            "{} of {} passages were longer than the model's {} tokens and were cut to them",
            out.cut,
            lines.len(),
            translate::source_limit(model)
        );
    }
    let mut stdout = std::io::stdout().lock();
    for hyps in out.outputs {
        writeln!(stdout, "{}", hyps.join("\t"))?;
    }
    crate::args::print_profile(1);
    Ok(())
}

#[derive(clap::Args)]
pub struct ClassifyArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Input tokens per batch.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Where the model runs: the CPU, or the first NVIDIA GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// One line per input: `label<TAB>probability`.
pub fn run_classify(a: ClassifyArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let mut dir = load(&a.model)?;
    a.precision.apply_to(&mut dir.model)?;
    let (AnyModel::Classifier(model), Some(labels)) = (&mut dir.model, &dir.files.labels) else {
        return Err(not_a(&a.model, "a classification model"));
    };
    let lines = stdin_lines()?;
    let (tok, max) = (&dir.files.tokenizer, a.max_tokens.max(1));
    let probs = match a.device {
        DeviceArg::Cpu => classify::predict(model, tok, &lines, max),
        DeviceArg::Cuda => {
            let mut twin = model.to_backend(first_gpu(a.precision)?)?;
            classify::predict(&mut twin, tok, &lines, max)
        }
    }
    .map_err(|e| name_input(e, "stdin line"))?;
    let mut stdout = std::io::stdout().lock();
    for p in probs {
        let k = argmax(&p);
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
    /// New tokens per prompt (default: the model's decoding setting).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Pick the most likely token instead of sampling.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of prompt 1's sample; prompt i samples with seed + i − 1, whatever else is
    /// generated beside it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Where the model generates: the CPU, or the first NVIDIA GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let mut dir = load(&a.model)?;
    a.precision.apply_to(&mut dir.model)?;
    let AnyModel::Lm(model) = &mut dir.model else {
        return Err(not_a(&a.model, "a language model"));
    };
    let prompts = match a.prompt {
        Some(p) => vec![p],
        None => stdin_lines()?,
    };
    let d = &dir.files.decode;
    let sampling = DecodeConfig {
        temperature: a.temperature.unwrap_or(d.temperature),
        top_k: a.top_k.or(d.top_k),
        top_p: a.top_p.or(d.top_p),
        ..d.clone()
    };
    let choices: Vec<Choice> = (0..prompts.len() as u64)
        .map(|i| match a.greedy {
            true => Choice::Greedy,
            false => Choice::Sample(sampling.sampling(a.seed.wrapping_add(i))),
        })
        .collect();
    let max_new = a
        .max_new_tokens
        .unwrap_or(d.max_new_tokens)
        .min(model.config.max_len.saturating_sub(1));
    let tok = &dir.files.tokenizer;
    let out = match a.device {
        DeviceArg::Cpu => lm::complete(model, tok, &prompts, max_new, &choices),
        DeviceArg::Cuda => {
            let mut twin = model.to_backend(first_gpu(a.precision)?)?;
            lm::complete(&mut twin, tok, &prompts, max_new, &choices)
        }
    }
    .map_err(|e| name_input(e, "prompt"))?;
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
    /// Where the model runs: the CPU, or the first NVIDIA GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

/// Sentence embeddings of stdin lines: one JSON array (mean-pooled, unit length) per line.
/// Lines longer than the model reads are cut to it, as sentence-transformers does, and
/// counted on stderr.
pub fn run_embed(a: EmbedArgs) -> Result<()> {
    let _precision = a.precision.apply();
    let mut dir = load(&a.model)?;
    a.precision.apply_to(&mut dir.model)?;
    let AnyModel::Classifier(model) = &mut dir.model else {
        return Err(not_a(
            &a.model,
            "an encoder (embeddings need a classifier or a BERT-family model)",
        ));
    };
    let lines = stdin_lines()?;
    let mut cut = 0;
    let (tok, max) = (&dir.files.tokenizer, a.max_tokens.max(1));
    let out = match a.device {
        DeviceArg::Cpu => classify::embed(model, tok, &lines, max, Some(&mut cut))?,
        DeviceArg::Cuda => {
            let mut twin = model.to_backend(first_gpu(a.precision)?)?;
            classify::embed(&mut twin, tok, &lines, max, Some(&mut cut))?
        }
    };
    if cut > 0 {
        eprintln!(
            "{cut} lines were longer than the model's {} tokens and were cut to them (as \
             sentence-transformers does)",
            model.config.max_len
        );
    }
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

/// Average parameters; the output is a model directory with the first input's files.
pub fn run_average(a: AverageArgs) -> Result<()> {
    let first = &a.inputs[0];
    let mut dir = load(first)?;
    for d in &a.inputs {
        if &qkv::checkpoint::load_config(d)? != dir.model.config() {
            bail!("{}: config differs from {}", d.display(), first.display());
        }
    }
    qkv::train::average_checkpoints(&a.inputs, dir.model.params_mut())?;
    dir.save(&a.output)?;
    eprintln!(
        "averaged {} checkpoints into {}",
        a.inputs.len(),
        a.output.display()
    );
    Ok(())
}
