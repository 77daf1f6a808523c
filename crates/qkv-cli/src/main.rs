//! The `qkv` command.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use qkv::bench::{self, BenchModel, TrainStepBench};

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
        what: BenchCommand,
    },
    /// Train a model from a job config (translate, classify or lm).
    Train(train::TrainArgs),
    /// Score a model directory on test data (BLEU/chrF, accuracy/F1, perplexity).
    Eval(eval::EvalArgs),
    /// Translate stdin to stdout, one sentence per line (batched beam search).
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
    /// Average the parameters of several checkpoints.
    Average(infer::AverageArgs),
    /// Train the copy task (the Annotated Transformer's first example) and report exact match.
    Copy(copy::CopyArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time one training step (forward, backward, AdamW) of a model.
    TrainStep(TrainStepArgs),
    /// Time one self-attention call (Tq = Tk = N) of one kernel; reports its peak memory.
    Attention(AttentionArgs),
    /// Load-test a running `qkv serve`: throughput and latency percentiles.
    Serve(serve::load::LoadArgs),
    /// Time one matrix product `(m, k) · (k, n)` in f32 or bf16 and report GFLOP/s.
    Matmul(MatmulArgs),
}

#[derive(clap::Args)]
struct MatmulArgs {
    #[arg(long)]
    m: usize,
    #[arg(long)]
    k: usize,
    #[arg(long)]
    n: usize,
    /// The left operand is stored transposed, (k, m).
    #[arg(long)]
    ta: bool,
    /// The right operand is stored transposed, (n, k) (as `x · Wᵀ`).
    #[arg(long)]
    tb: bool,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum AttentionKindArg {
    Flash,
    Reference,
    Linear,
    Window,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DtypeArg {
    F32,
    Bf16,
}

/// `--dtype` of the inference commands (a job's training precision is in its config).
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct PrecisionArgs {
    /// Operand precision of the matrix products: bf16 runs them on the CPU's avx512_bf16
    /// dot-product instruction with f32 sums and f32 weights (f32 on CPUs without it).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

impl PrecisionArgs {
    /// Use this precision on the calling thread until the guard drops.
    pub fn apply(self) -> qkv::kernels::matmul::PrecisionGuard {
        qkv::kernels::matmul::set_matmul_precision(self.dtype.precision())
    }
}

impl DtypeArg {
    fn precision(self) -> qkv::kernels::matmul::Precision {
        match self {
            DtypeArg::F32 => qkv::kernels::matmul::Precision::F32,
            DtypeArg::Bf16 => qkv::kernels::matmul::Precision::Bf16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

#[derive(clap::Args)]
struct AttentionArgs {
    /// Sequence length (queries = keys).
    #[arg(long)]
    n: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    causal: bool,
    /// Time forward + backward instead of forward only.
    #[arg(long)]
    backward: bool,
    #[arg(long, value_enum, default_value = "flash")]
    kind: AttentionKindArg,
    /// Keys per query for `--kind window`.
    #[arg(long, default_value_t = 256)]
    window: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Timed calls (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModelKind {
    Encoder,
    Seq2seq,
    Lm,
    Classifier,
}

#[derive(clap::Args)]
struct TrainStepArgs {
    #[arg(long, value_enum, default_value = "encoder")]
    model: ModelKind,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 256)]
    d_model: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 1024)]
    d_ff: usize,
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long, default_value_t = 8000)]
    vocab: usize,
    /// Operand precision of the matrix products: bf16 is mixed precision (f32 weights and sums).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Encoder model: also compute the gradient of the random input (PyTorch computes it only
    /// for an input with requires_grad; the comparison script passes this flag to both sides).
    #[arg(long)]
    input_grad: bool,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
}

mod attention;
mod copy;
mod eval;
mod infer;
mod job;
mod plot;
mod serve;
mod train;

/// Peak resident set size of this process in MiB (Linux: VmHWM).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
                what: BenchCommand::Serve(_)
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
        Command::Bench {
            what: BenchCommand::TrainStep(a),
        } => {
            if a.steps == 0 || a.batch == 0 || a.seq == 0 || a.layers == 0 || a.vocab < 2 {
                bail!(
                    "--steps, --batch, --seq and --layers must be positive and --vocab at least 2"
                );
            }
            let model = match a.model {
                ModelKind::Encoder => BenchModel::Encoder,
                ModelKind::Seq2seq => BenchModel::Seq2seq,
                ModelKind::Lm => BenchModel::Lm,
                ModelKind::Classifier => BenchModel::Classifier,
            };
            let b = TrainStepBench {
                model,
                batch: a.batch,
                seq: a.seq,
                d_model: a.d_model,
                heads: a.heads,
                d_ff: a.d_ff,
                layers: a.layers,
                vocab: a.vocab,
                steps: a.steps,
                warmup: a.warmup,
                precision: a.dtype.precision(),
                input_grad: a.input_grad,
            };
            let times = bench::train_step(&b)?;
            let ms = bench::median(&times);
            let line = serde_json::json!({
                "impl": "qkv",
                "model": format!("{:?}", model).to_lowercase(),
                "batch": a.batch, "seq": a.seq, "d_model": a.d_model, "heads": a.heads, "d_ff": a.d_ff, "layers": a.layers,
                "threads": threads, "dtype": effective_dtype(a.dtype), "input_grad": a.input_grad,
                "ms_per_step": (ms * 1000.0).round() / 1000.0,
                "min_ms": (times.iter().cloned().fold(f64::INFINITY, f64::min) * 1000.0).round() / 1000.0,
                "tokens_per_s": ((a.batch * a.seq) as f64 / (ms / 1e3)).round(),
                "peak_rss_mb": peak_rss_mb().map(|m| (m * 10.0).round() / 10.0),
            });
            println!("{line}");
            print_profile(a.steps + a.warmup);
        }
        Command::Bench {
            what: BenchCommand::Attention(a),
        } => bench_attention(a, threads)?,
        Command::Bench {
            what: BenchCommand::Serve(a),
        } => serve::load::run(a)?,
        Command::Bench {
            what: BenchCommand::Matmul(a),
        } => {
            if a.steps == 0 || a.m == 0 || a.k == 0 || a.n == 0 {
                bail!("--steps, --m, --k and --n must be positive");
            }
            let times = bench::matmul(
                a.m,
                a.k,
                a.n,
                a.ta,
                a.tb,
                a.dtype.precision(),
                a.steps,
                a.warmup,
            );
            let ms = bench::median(&times);
            let gflop = 2.0 * (a.m * a.k * a.n) as f64 / 1e9;
            let line = serde_json::json!({
                "impl": "qkv", "m": a.m, "k": a.k, "n": a.n, "ta": a.ta, "tb": a.tb,
                "dtype": effective_dtype(a.dtype), "threads": threads,
                "ms": (ms * 1000.0).round() / 1000.0,
                "gflops": (gflop / (ms / 1e3) * 100.0).round() / 100.0,
            });
            println!("{line}");
            print_profile(a.steps + a.warmup);
        }
        Command::Serve(args) => serve::run(args)?,
        Command::Attention(args) => attention::run(args)?,
        Command::Copy(args) => copy::run(args)?,
        Command::Train(args) => train::run(args)?,
        Command::Eval(args) => eval::run(args)?,
        Command::Translate(args) => infer::run_translate(args)?,
        Command::Classify(args) => infer::run_classify(args)?,
        Command::Generate(args) => infer::run_generate(args)?,
        Command::Embed(args) => infer::run_embed(args)?,
        Command::Average(args) => infer::run_average(args)?,
    }
    Ok(())
}

/// With `QKV_PROFILE=1`, where the time of each of `steps` went, to stderr.
pub(crate) fn print_profile(steps: usize) {
    if qkv::profile::enabled() {
        let steps = steps as f64;
        for (name, ms, calls) in qkv::profile::report() {
            eprintln!(
                "{:>9.3} ms/step  {:>6} calls/step  {name}",
                ms / steps,
                calls as f64 / steps
            );
        }
    }
}

/// The dtype a benchmark really ran: bf16 falls back to f32 on CPUs without avx512_bf16.
fn effective_dtype(d: DtypeArg) -> &'static str {
    match d {
        DtypeArg::Bf16 if !qkv::kernels::bf16::available() => "f32 (no avx512_bf16)",
        d => d.name(),
    }
}

fn bench_attention(a: AttentionArgs, threads: usize) -> Result<()> {
    use qkv::bench::{AttentionBench, AttentionKernel};
    if matches!(a.dtype, DtypeArg::Bf16)
        && matches!(
            a.kind,
            AttentionKindArg::Reference | AttentionKindArg::Linear
        )
    {
        bail!(
            "--dtype bf16 with --kind {}: the materialized and linear attention kernels compute \
             in f32 only; bf16 tile products are flash's (--kind flash or window)",
            a.kind_name()
        );
    }
    if a.window == 0 {
        bail!("--window must be at least 1");
    }
    let kernel = match a.kind {
        AttentionKindArg::Flash => AttentionKernel::Flash,
        AttentionKindArg::Reference => AttentionKernel::Reference,
        AttentionKindArg::Linear => AttentionKernel::Linear,
        AttentionKindArg::Window => AttentionKernel::Window(a.window),
    };
    let b = AttentionBench {
        kernel,
        batch: a.batch,
        heads: a.heads,
        n: a.n,
        head_dim: a.head_dim,
        causal: a.causal,
        backward: a.backward,
        steps: a.steps,
        warmup: a.warmup,
        precision: a.dtype.precision(),
    };
    let base = peak_rss_mb();
    let times = bench::attention(&b)?;
    let ms = bench::median(&times);
    let peak = peak_rss_mb();
    let tensors = b.tensor_bytes() as f64 / (1024.0 * 1024.0);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    let line = serde_json::json!({
        "impl": "qkv",
        "kind": a.kind_name(),
        "n": a.n, "heads": a.heads, "head_dim": a.head_dim, "batch": a.batch,
        "causal": a.causal, "backward": a.backward, "dtype": effective_dtype(a.dtype),
        "threads": threads,
        "ms": (ms * 1000.0).round() / 1000.0,
        "min_ms": (times.iter().cloned().fold(f64::INFINITY, f64::min) * 1000.0).round() / 1000.0,
        "peak_rss_mb": peak.map(round),
        // What the process held before the benchmark, and Q, K, V, O (+ dO, dQ, dK, dV):
        // peak − baseline − tensors is the kernel's own extra memory.
        "baseline_rss_mb": base.map(round),
        "tensors_mb": round(tensors),
        "extra_mb": peak.zip(base).map(|(p, b)| round(p - b - tensors)),
    });
    println!("{line}");
    Ok(())
}

impl AttentionArgs {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            AttentionKindArg::Flash => "flash",
            AttentionKindArg::Reference => "reference",
            AttentionKindArg::Linear => "linear",
            AttentionKindArg::Window => "window",
        }
    }
}
