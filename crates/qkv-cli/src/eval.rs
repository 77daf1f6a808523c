//! Loading a model directory (any family) and scoring it: BLEU/chrF for translation,
//! accuracy/macro-F1/confusion for classification, perplexity/bits per character for LM.
//! Shared by `qkv train` (final test evaluation) and `qkv eval`.

use anyhow::{bail, Context, Result};
use qkv::data::{read_labelled, read_parallel, read_text, Tokenizer};
use qkv::decode::BeamConfig;
use qkv::metrics::sacrebleu::{corpus_bleu, corpus_chrf, BleuOptions, ChrfOptions};
use qkv::metrics::{bits_per_char, classification_report};
use qkv::model::{Classifier, Family, LanguageModel, Seq2Seq};
use qkv::tasks::classify::{argmax, predict, Labels};
use qkv::tasks::lm::encode_text;
use qkv::tasks::translate::{translate, TranslateOptions};
use std::path::Path;
use std::time::Instant;

pub const LABELS_FILE: &str = "labels.json";
/// The target side's vocabulary when a translation model has one per side.
pub const TARGET_TOKENIZER: &str = "target_tokenizer.json";

pub enum AnyModel {
    Seq2Seq(Seq2Seq),
    Classifier(Classifier),
    Lm(LanguageModel),
}

pub struct Loaded {
    pub model: AnyModel,
    pub tok: Tokenizer,
    /// The target tokenizer of a translation model (the same as `tok` when joint).
    pub tgt_tok: Tokenizer,
    pub labels: Option<Labels>,
}

pub fn save_labels(path: &Path, labels: &Labels) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(&labels.0)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Load `config.json`, `model.safetensors`, `tokenizer.json` (and `labels.json`) from `dir`:
/// a qkv checkpoint, or a Hugging Face BERT-family encoder (an embedding model).
pub fn load_model_dir(dir: &Path) -> Result<Loaded> {
    if !dir.is_dir() {
        bail!("{}: not a model directory", dir.display());
    }
    if qkv::hf::is_hf_dir(dir) {
        let enc = qkv::hf::HfEncoder::open(dir)?;
        let model = enc.embedding_model()?;
        return Ok(Loaded {
            model: AnyModel::Classifier(model),
            tgt_tok: enc.tokenizer.clone(),
            tok: enc.tokenizer,
            labels: None,
        });
    }
    let cfg = qkv::checkpoint::load_config(dir)?;
    let tok = Tokenizer::load(&dir.join("tokenizer.json"))?;
    if tok.pad != cfg.pad_id {
        bail!(
            "{}: the tokenizer pads with id {} but the model with {}",
            dir.display(),
            tok.pad,
            cfg.pad_id
        );
    }
    let model = match cfg.family {
        Family::Seq2seq => {
            let mut m = Seq2Seq::new(cfg.clone(), 0)?;
            qkv::checkpoint::load(dir, &cfg, &mut m.params)?;
            AnyModel::Seq2Seq(m)
        }
        Family::Classifier => {
            let mut m = Classifier::new(cfg.clone(), 0)?;
            qkv::checkpoint::load(dir, &cfg, &mut m.params)?;
            AnyModel::Classifier(m)
        }
        Family::Lm => {
            let mut m = LanguageModel::new(cfg.clone(), 0)?;
            qkv::checkpoint::load(dir, &cfg, &mut m.params)?;
            AnyModel::Lm(m)
        }
    };
    let tgt_path = dir.join(TARGET_TOKENIZER);
    let tgt_tok = if tgt_path.exists() {
        let t = Tokenizer::load(&tgt_path)?;
        qkv::tasks::translate::check_specials(&tok, &t)?;
        t
    } else {
        tok.clone()
    };
    let labels = match cfg.family {
        Family::Classifier if cfg.n_classes > 0 => {
            let path = dir.join(LABELS_FILE);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let names: Vec<String> = serde_json::from_str(&text).with_context(|| {
                format!("{}: expected a JSON list of label names", path.display())
            })?;
            if names.len() != cfg.n_classes {
                bail!(
                    "{}: {} labels for a model with {} classes",
                    path.display(),
                    names.len(),
                    cfg.n_classes
                );
            }
            Some(Labels(names))
        }
        _ => None,
    };
    Ok(Loaded {
        model,
        tok,
        tgt_tok,
        labels,
    })
}

/// Translate the sources of `pairs` and score against their targets; returns the hypotheses.
pub fn eval_translate(
    model: &mut Seq2Seq,
    src_tok: &Tokenizer,
    tgt_tok: &Tokenizer,
    pairs: &[(String, String)],
    opts: &TranslateOptions,
) -> Result<Vec<String>> {
    let t = Instant::now();
    let sources: Vec<String> = pairs.iter().map(|(s, _)| s.clone()).collect();
    let refs: Vec<String> = pairs.iter().map(|(_, t)| t.clone()).collect();
    let hyps: Vec<String> = translate(model, src_tok, tgt_tok, &sources, opts)?
        .into_iter()
        .map(|mut h| h.swap_remove(0))
        .collect();
    let bleu = corpus_bleu(&hyps, &[refs.clone()], &BleuOptions::default())?;
    let chrf = corpus_chrf(&hyps, &[refs], &ChrfOptions::default())?;
    println!(
        "{} sentences, beam {}, {:.1} s",
        hyps.len(),
        opts.beam.beam,
        t.elapsed().as_secs_f64()
    );
    println!("{bleu}");
    println!("{chrf}");
    Ok(hyps)
}

pub fn eval_classify(
    model: &mut Classifier,
    tok: &Tokenizer,
    labels: &Labels,
    examples: &[(String, String)],
) -> Result<()> {
    let mut gold = Vec::with_capacity(examples.len());
    for (i, (l, _)) in examples.iter().enumerate() {
        gold.push(labels.id(l).with_context(|| {
            format!(
                "example {}: unknown label `{l}` (model labels: {})",
                i + 1,
                labels.0.join(", ")
            )
        })?);
    }
    let texts: Vec<String> = examples.iter().map(|(_, t)| t.clone()).collect();
    let probs = predict(model, tok, &texts, 8192)?;
    let pred: Vec<u32> = probs.iter().map(|p| argmax(p)).collect();
    let r = classification_report(&gold, &pred, labels.0.len());
    println!(
        "{} examples: accuracy {:.2}%, macro-F1 {:.2}%",
        gold.len(),
        100.0 * r.accuracy,
        100.0 * r.macro_f1
    );
    let width = labels.0.iter().map(|l| l.len()).max().unwrap_or(4).max(6);
    println!("confusion (rows: gold, columns: predicted)");
    print!("{:>width$}", "");
    for l in &labels.0 {
        print!(" {l:>width$}");
    }
    println!("  F1");
    for (k, row) in r.confusion.iter().enumerate() {
        print!("{:>width$}", labels.0[k]);
        for c in row {
            print!(" {c:>width$}");
        }
        println!("  {:.3}", r.per_class_f1[k]);
    }
    Ok(())
}

pub fn eval_lm(model: &mut LanguageModel, tok: &Tokenizer, text: &str) -> Result<()> {
    let stream = encode_text(tok, text)?;
    let len = model.config.max_len - 1;
    let batches = stream.epoch_batches(len, 8192, 0, 0)?;
    let (mut sum, mut n) = (0.0, 0usize);
    for b in &batches {
        let (s, c) = qkv::train::Trainable::eval_batch(model, b)?;
        sum += s;
        n += c;
    }
    // Bits per character over the characters the scored tokens cover (whole blocks only).
    let covered = stream.chars as f64 * n as f64 / stream.ids.len().max(1) as f64;
    println!(
        "{} tokens: loss {:.4} nats/token, perplexity {:.2}, bits per character {:.4}",
        n,
        sum / n.max(1) as f64,
        (sum / n.max(1) as f64).exp(),
        bits_per_char(sum, covered.round() as usize)
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model directory (a checkpoint, e.g. runs/translate-en-es/best).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Test data: `source<TAB>target` (translate), `label<TAB>text` (classify) or text (lm).
    #[arg(long)]
    pub data: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    pub beam: usize,
    #[arg(long, default_value_t = 1.0)]
    pub lenpen: f32,
    /// Write the translations here.
    #[arg(long)]
    pub output: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub precision: crate::PrecisionArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let _precision = args.precision.apply();
    let Loaded {
        model,
        tok,
        tgt_tok,
        labels,
    } = load_model_dir(&args.model)?;
    match model {
        AnyModel::Seq2Seq(mut m) => {
            let pairs = read_parallel(&args.data, false)?.records;
            let opts = TranslateOptions {
                beam: BeamConfig {
                    beam: args.beam,
                    length_penalty: args.lenpen,
                    nbest: 1,
                },
                ..TranslateOptions::default()
            };
            let hyps = eval_translate(&mut m, &tok, &tgt_tok, &pairs, &opts)?;
            if let Some(out) = args.output {
                std::fs::write(&out, hyps.join("\n") + "\n")
                    .with_context(|| format!("writing {}", out.display()))?;
            }
        }
        AnyModel::Classifier(mut m) => {
            let examples = read_labelled(&args.data, false)?.records;
            eval_classify(&mut m, &tok, labels.as_ref().context("labels")?, &examples)?;
        }
        AnyModel::Lm(mut m) => eval_lm(&mut m, &tok, &read_text(&args.data)?)?,
    }
    Ok(())
}
