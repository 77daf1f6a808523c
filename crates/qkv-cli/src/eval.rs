//! `qkv eval`: score a model directory on a test file (`qkv::pipeline::evaluate`).

use crate::args::{DeviceArg, PrecisionArgs};
use crate::infer::Translator;
use anyhow::{bail, Context, Result};
use qkv::model_dir::ModelDir;
use qkv::pipeline::evaluate_translation;
use qkv::tasks::Report;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model directory (a checkpoint, e.g. runs/translate-en-es/best). Several translation or
    /// summarization models (`--model a b`) decode as an ensemble, as `qkv translate`'s.
    #[arg(long, required = true, num_args = 1..)]
    pub model: Vec<PathBuf>,
    /// Test data: `source<TAB>target` (translate), `label<TAB>text` (classify) or text (lm).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub decode: crate::infer::DecodeArgs,
    /// Tokens per batch.
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Write the translations here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Where the model runs: the CPU, or the first NVIDIA GPU (one model: an ensemble
    /// decodes on the CPU).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.device == DeviceArg::Cuda {
        crate::args::gpu_bf16(args.precision)?;
    }
    let _precision = args.precision.apply();
    let report = if let [path] = &args.model[..] {
        let mut dir = ModelDir::load(path)?;
        args.precision.apply_to(&mut dir.model)?;
        let decode = args.decode.over(&dir.files.decode)?;
        let (data, max, device) = (&args.data, args.max_tokens, args.device.device());
        qkv::pipeline::evaluate_on(&mut dir, data, Some(&decode), max, device)?
    } else if args.device == DeviceArg::Cuda {
        bail!("--device cuda decodes one model: an ensemble decodes on the CPU");
    } else {
        let (model, files) = crate::infer::load_translator(&args.model, args.precision)?;
        let decode = args.decode.over(&files.decode)?;
        let (data, max) = (&args.data, args.max_tokens);
        match model {
            Translator::Ensemble(mut m) => {
                evaluate_translation(&mut m, &files, data, Some(&decode), max)?
            }
            Translator::One(mut m) => {
                evaluate_translation(&mut *m, &files, data, Some(&decode), max)?
            }
        }
    };
    println!("{report}");
    if let (Some(out), Report::Translate(r)) = (&args.output, &report) {
        std::fs::write(out, r.hypotheses.join("\n") + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
