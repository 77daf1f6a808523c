//! The `qkv` command: argument parsing and printing over the library (`qkv::pipeline`,
//! `qkv::model_dir`, `qkv::tasks`); each subcommand is a module.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod args;
mod attention;
mod bench;
mod copy;
mod eval;
mod export;
mod infer;
mod plot;
mod serve;
mod train;

#[derive(Parser)]
#[command(
    name = "qkv",
    version,
    about = "Train, evaluate, inspect and serve Transformers (Vaswani et al., 2017) on the CPU"
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks (print one JSON line).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Train a model from a job config (translate, summarize, classify or lm).
    Train(train::TrainArgs),
    /// Score a model directory on test data (BLEU/chrF, accuracy/F1, perplexity).
    Eval(eval::EvalArgs),
    /// Translate stdin to stdout, one sentence per line (batched beam search); a summarizer
    /// gives one summary per passage.
    Translate(infer::TranslateArgs),
    /// Classify stdin lines: prints `label<TAB>probability` per line.
    Classify(infer::ClassifyArgs),
    /// Continue a prompt with a language model (sampling or greedy).
    Generate(infer::GenerateArgs),
    /// Sentence embeddings of stdin lines (JSON arrays), from a BERT-family encoder such as
    /// all-MiniLM-L6-v2 or a qkv classifier.
    Embed(infer::EmbedArgs),
    /// Attention maps of one input for every layer and head: PNG heatmaps and an HTML viewer.
    Attention(attention::AttentionArgs),
    /// Serve a model over HTTP (translate, classify, generate, embed) with dynamic batching.
    Serve(serve::ServeArgs),
    /// Write a model directory in another toolkit's format (CTranslate2).
    Export(export::ExportArgs),
    /// Average the parameters of several checkpoints.
    Average(infer::AverageArgs),
    /// Train the copy task (the Annotated Transformer's first example) and report exact match.
    Copy(copy::CopyArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(e) = qkv::simd::isa_request_error() {
        bail!(e);
    }
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")?;
    let command = cli.command;
    if matches!(
        command,
        Command::Serve(_)
            | Command::Bench {
                what: bench::BenchCommand::Serve(_)
            }
    ) {
        // The server computes on threads of its own (one per model), which fork into the pool.
        return run(command, threads);
    }
    // Everything else runs on a pool thread, so each kernel's parallel loop forks from inside
    // the pool (work stealing) instead of being injected from outside while this thread sleeps
    // on a lock until it is done: that round trip, dozens of times per training step, cost
    // about 2–3% of the step in wake-ups (perf: kernel time 4.4% → 2.9%).
    rayon::scope(|_| run(command, threads))
}

fn run(command: Command, threads: usize) -> Result<()> {
    match command {
        Command::Bench { what } => bench::run(what, threads),
        Command::Serve(args) => serve::run(args),
        Command::Attention(args) => attention::run(args),
        Command::Copy(args) => copy::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Translate(args) => infer::run_translate(args),
        Command::Classify(args) => infer::run_classify(args),
        Command::Generate(args) => infer::run_generate(args),
        Command::Embed(args) => infer::run_embed(args),
        Command::Average(args) => infer::run_average(args),
        Command::Export(args) => export::run(args),
    }
}
